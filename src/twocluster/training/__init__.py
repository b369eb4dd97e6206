"""The GPU side: staged data and input pipelines, model modules, the trainer, and the gate that publishes a model."""
