"""instructkit: the InstructGPT recipe (SFT, reward model, PPO, DPO) for LLaMA-family models."""

__version__ = "0.1.0"
