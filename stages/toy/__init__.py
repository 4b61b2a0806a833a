"""The toy world of the embedded default run, kept apart from the production stages.

What it holds: the synthetic data set of coloured shapes with masks and captions (:mod:`.world`), the
tiny LLaVA-architecture model built offline (:mod:`.model`), its caption-only trainer
(:mod:`.train_lmm`), the toy DiffLMM with its tiny Stable Diffusion, trained on the same captions with the
same budget for the CLIP-tower vs UNet-tower comparison (:mod:`.difflmm`), the tiny SAM's trainer
(:mod:`.train_sam`) and development checks of the trained
toy models through the pipeline's own stages (:mod:`.diagnostics`). The workflow's toy rules
(``workflow/rules/toy.smk``) run it; the tests use it as fixture data and models.

The toy package may import production modules (the trainers reuse the generate stage's preprocessing,
the SAM builder, the artifact writers); production stages never import it (``tests/test_layout.py``
checks that), so the pipeline's code, and each rule's code version, does not depend on the toy world.
"""
