"""Model surgery outside the merge engine: ``tokensurgeon`` gives a model another model's
tokenizer (``rows``: the math that makes the new embedding rows; ``tokensurgeon``: reading,
matching the vocabularies and writing the output)."""
