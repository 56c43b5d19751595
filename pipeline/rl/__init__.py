"""Our own small PPO for RLHF (TRL removed its PPOTrainer in 2026): math, rollouts, loop."""
