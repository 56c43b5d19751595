"""Reward-model scores and response log-probabilities, batched (reward, ppo, eval)."""
from __future__ import annotations


def reward_scores(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """One scalar per full conversation (prompt messages + the assistant's answer)."""
    import torch

    scores: list[float] = []
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False)
                 for c in conversations[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            scores += model(**batch).logits[:, 0].float().tolist()
    return scores
