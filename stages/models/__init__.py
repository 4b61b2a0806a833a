"""Model builders behind registries (LMM families, toy models); heavy imports happen lazily inside them."""
