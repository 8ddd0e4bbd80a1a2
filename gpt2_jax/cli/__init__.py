"""The gpt2-jax command: one module per command. The only place that sets process-wide state."""
