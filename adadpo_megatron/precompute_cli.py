"""python -m adadpo_megatron.precompute_cli --config FILE.yaml: adadpo-precompute-reference."""

from adadpo_megatron.cli import precompute_main

if __name__ == "__main__":
    precompute_main()
