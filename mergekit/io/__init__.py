"""Reading models (local folders, the hub cache, safetensors and .bin) and writing outputs."""
