"""The pipeline's stages, in the order they run. One stage, one module."""
from pipeline.stages import base, dataset, index

REGISTRY = {
    "base": base,
    "index": index,
    "dataset": dataset,
}
