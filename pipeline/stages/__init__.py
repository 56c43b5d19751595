"""The pipeline's stages, in the order they run. One stage, one module."""
from pipeline.stages import base, dataset, dpo, evaluate, index, ppo, reader, reward, sft

REGISTRY = {
    "base": base,
    "index": index,
    "reader": reader,
    "dataset": dataset,
    "sft": sft,
    "reward": reward,
    "dpo": dpo,
    "ppo": ppo,
    "eval": evaluate,
}
