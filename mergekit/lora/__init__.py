"""LoRA adapters from weight differences: truncated SVD factors (``factor``) and the files
peft loads (``adapter_out``). Pure math and writing: nothing here knows the recipe, the plan
or the command line."""
