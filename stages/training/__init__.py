"""LLaVA-1.5's two-stage training recipe for DiffLMM and the CLIP-tower baseline (config ``training:``,
rules train_stage1 / train_stage2): :mod:`.recipe` (settings), :mod:`.data` (LLaVA JSON to token ids
and labels), :mod:`.model` (the trainable model and its published layouts), :mod:`.trainer` (the
resumable loop), :mod:`.curve` (the loss curve PNG), :mod:`.launch` (one job on N GPUs)."""
