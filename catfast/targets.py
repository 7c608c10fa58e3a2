"""Named sets of LoRA target modules (suffixes of module names, as peft's ``target_modules`` takes them).
Imports nothing: the command line reads these for its defaults before anything heavy loads."""

# Every attention projection (self- and cross-attention: query, key, value, output): the CAT paper's targets
# and catfast's default, for training, benchmarks and the shipped demo adapters.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
