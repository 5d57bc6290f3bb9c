"""Training: tasks (losses and metrics per model kind), the Accelerate engine, checkpoints."""
