"""forkrl: reinforcement learning with verifiable rewards, built around high-entropy forking tokens."""

__version__ = "0.1.0"
