"""Fine-tuning DiffusionGemma: the objective (``losses``), batches of
examples (``batches``), data files (``datasets``) and the training loop
(``trainer``). mlx-lm's tuner provides the LoRA/DoRA layers, optimizers and
schedules."""
