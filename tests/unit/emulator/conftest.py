"""An emulated fleet on this test's event loop, serving the test model's tokenizer."""

from tests.emulated import fleet, model_dir

__all__ = ["fleet", "model_dir"]  # fixtures, registered by importing them here
