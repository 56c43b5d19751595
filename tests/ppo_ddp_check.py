"""Run by tests/test_ppo.py under torchrun with 2 CPU processes (what `accelerate launch`
starts on several GPUs): three PPO steps on a tiny model; each process writes its adapter
weights, the texts it sampled and its KL coefficients."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from test_ppo import _tiny_policy, _vowel_share  # noqa: E402

from pipeline.rl.trainer import PPOSettings, train  # noqa: E402


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    policy, tokenizer = _tiny_policy()
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    prompts = [[{"role": "user", "content": q}] for q in ("hi", "tell me", "what is it", "go")]
    sampled: list[str] = []

    def reward(batch, texts):
        sampled.extend(texts)
        return _vowel_share(batch, texts)

    settings = PPOSettings(steps=3, batch_size=4, minibatch_size=2, ppo_epochs=1, learning_rate=1e-2,
                           response_min=4, response_max=8, temperature=1.0, seed=0)
    history, _ = train(policy, tokenizer, prompts, reward, settings, accelerator)
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in policy.named_parameters() if p.requires_grad)
    weights = {n: p.detach().flatten()[:16].tolist() for n, p in policy.named_parameters() if p.requires_grad}
    result = {"rank": accelerator.process_index, "processes": accelerator.num_processes, "moved": moved,
              "weights": weights, "sampled": sampled, "kl_coef": [row["kl_coef"] for row in history]}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
