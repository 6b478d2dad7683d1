"""Merge methods, one module each (or per family); importing this package registers them."""

from mergekit.methods import (  # noqa: F401
    arcee_fusion,
    breadcrumbs,
    dare,
    karcher,
    linear,
    lora_cat,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
