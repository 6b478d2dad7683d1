from conftest import load_state


def test_linear_two_models(llama_models, merge):
    a, b, _ = llama_models
    out = merge({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": 3.0}}]})
    A, B, O = load_state(a), load_state(b), load_state(out)
    for name in A:
        expected = (A[name] * 1.0 + B[name] * 3.0) / 4.0
        assert (O[name] - expected).abs().max() < 1e-6, name
