"""roads — what is reinforcement learning worth in fine-tuning?

The library: configs, data (synthetic gold-reward tasks and real preference data), models, and one module per
stage. Pure Python + torch/transformers/trl/datasets/pandas; it never imports prefect or mlflow.
"""

__version__ = "0.1.0"
