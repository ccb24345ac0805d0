"""The base layer, what every other layer may use: errors, the Qwen3 config, result types, validation tables,
shape buckets, the offline Qwen3 vocabulary, the process set-up of entry points and the mesh flags of the
command line. No JAX here."""
