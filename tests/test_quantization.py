"""Weight quantization of the local backend (backends/quantize.py, Local.quantization).

Fast tests run on a tiny random Llama built from a config (no download, no
weights on disk); the ones marked `model` load the embedded SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from contextwise.backends.quantize import (
    MODES,
    Int8Embedding,
    Int8Head,
    check_mode,
    quantize,
    weight_bytes,
)
from contextwise.memory.store import Store

from contextwise import BackendError, Pipeline, Policy, PolicyError
from contextwise.pipeline import model_identity
from contextwise.policy import Local
from contextwise.types import Call, Message, Params

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="quantization needs torchao"
)
CPU_MODES = ["int8", "int8-dynamic", "int4"]


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with tied embeddings, shaped so every CPU format applies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64]])


# -- policy and errors (no model)


@pytest.mark.parametrize("mode", MODES)
def test_policy_accepts_every_mode(mode: str) -> None:
    policy = Policy.from_dict({"backend": {"quantization": mode}})
    assert policy.backend.quantization == mode


def test_bad_mode_is_a_policy_error_naming_the_field() -> None:
    with pytest.raises(PolicyError, match=r"backend\.quantization") as e:
        Policy.from_dict({"backend": {"quantization": "int3"}})
    assert "int3" in str(e.value)


def test_fp8_on_cpu_refuses_naming_mode_and_device() -> None:
    with pytest.raises(BackendError, match=r"'fp8'.*'cpu'"):
        check_mode("fp8", "cpu")


def test_fp8_on_cpu_refuses_before_loading_any_weights() -> None:
    from contextwise.backends.loading import load_model

    # the check runs before the model is resolved: this fails fast even without the model
    with pytest.raises(BackendError, match="fp8"):
        load_model("no-such-model-anywhere", device="cpu", quantization="fp8")


def test_fp8_on_cpu_refuses_in_quantize() -> None:
    with pytest.raises(BackendError, match=r"'fp8'.*compute capability >= 8\.9"):
        quantize(tiny_llama(), "fp8", "cpu")


def test_unknown_mode_outside_the_policy_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match=r"unknown quantization 'int3'.*int8-dynamic"):
        quantize(tiny_llama(), "int3", "cpu")


def test_model_identity_includes_quantization() -> None:
    a = model_identity(Policy())
    b = model_identity(Policy(backend=Local(quantization="int8")))
    assert a != b and "quantization=int8" in b


def test_cache_keys_on_a_given_backends_quantization(make_backend, store: Store) -> None:
    class Quantized(make_backend):
        quantization = "int4"

    def cache_model(backend) -> str:
        pipeline = Pipeline(Policy(), backend=backend, store=store)
        return next(s for s in pipeline.stages if s.name == "cache").cache.model

    assert cache_model(make_backend()) == "fake-model"
    assert cache_model(Quantized()) == "fake-model|quantization=int4"


def test_missing_torchao_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails
    with pytest.raises(BackendError, match=r"'int8' needs torchao: pip install 'torchao"):
        quantize(tiny_llama(), "int8", "cpu")


# -- the formats on a tiny model (no download)


def test_none_leaves_the_model_alone() -> None:
    model = tiny_llama()
    before = weight_bytes(model)
    assert quantize(model, "none", "cpu") is model
    assert weight_bytes(model) == before
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)


def test_weight_bytes_counts_tied_weights_once() -> None:
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # deduplicated
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    assert weight_bytes(model) == params + buffers


@needs_torchao
@pytest.mark.parametrize("mode", CPU_MODES)
def test_cpu_mode_quantizes_every_linear_and_stays_close(mode: str) -> None:
    ref = tiny_llama()
    model = tiny_llama()
    quantize(model, mode, "cpu")
    assert model.contextwise_quantization == {"mode": mode, "layers": 14, "of": 14}
    # the tied embedding / head is one int8 matrix, shared
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Head)
    assert emb.rows is head.rows and emb.rows.qdata.dtype == torch.int8
    with torch.inference_mode():
        want = ref(IDS).logits
        got = model(IDS).logits
    assert got.dtype == want.dtype and got.shape == want.shape
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.15 if mode == "int4" else 0.05), rel


@needs_torchao
def test_bytes_shrink_int8_under_fp32_int4_under_int8() -> None:
    sizes = {}
    for mode in ("none", "int8", "int8-dynamic", "int4"):
        sizes[mode] = weight_bytes(quantize(tiny_llama(), mode, "cpu"))
    assert sizes["int8"] < sizes["none"] / 3
    assert sizes["int8-dynamic"] == sizes["int8"]
    assert sizes["int4"] < sizes["int8"]


@needs_torchao
def test_int8_head_matches_for_one_row_and_many() -> None:
    """The head takes ATen's int8 kernel for 1-2 rows and sliced de-quantize for more."""
    model = tiny_llama()
    weight = model.lm_head.weight.detach().clone()
    quantize(model, "int8", "cpu")
    head = model.get_output_embeddings()
    head.CHUNK = 100  # several slices over the 256 rows
    rows = head.rows
    deq = rows.qdata.float() * rows.scale[:, None]
    assert (deq - weight).abs().max() <= rows.scale.max() / 2 + 1e-6
    for n in (1, 2, 5):
        x = torch.randn(1, n, 64)
        torch.testing.assert_close(head(x), x @ deq.t(), rtol=1e-4, atol=1e-4)


@needs_torchao
@pytest.mark.parametrize("mode", CPU_MODES)
def test_generate_runs_on_a_quantized_tiny_model(mode: str) -> None:
    model = quantize(tiny_llama(), mode, "cpu")
    with torch.inference_mode():
        out = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 4)


@needs_torchao
def test_int4_on_a_bf16_model_runs_without_casts() -> None:
    ref = tiny_llama().to(torch.bfloat16)
    model = quantize(tiny_llama().to(torch.bfloat16), "int4", "cpu")
    layer = model.model.layers[0].mlp.up_proj
    assert not layer._forward_pre_hooks  # only float32 models get the bf16 casts
    with torch.inference_mode():
        want, got = ref(IDS).logits.float(), model(IDS).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 0.15


# -- the embedded model


@pytest.fixture(scope="module")
def backends() -> dict:
    from contextwise.backends.local import LocalBackend

    return {m: LocalBackend(device="cpu", quantization=m, prefix_cache_mb=0)
            for m in ("none", *CPU_MODES)}


def _ask(backend, question: str, max_tokens: int = 12) -> str:
    call = Call(messages=[Message(role="user", content=question)],
                params=Params(max_tokens=max_tokens))
    return backend.generate([call])[0].text


@needs_torchao
@pytest.mark.model
@pytest.mark.parametrize("mode", CPU_MODES)
def test_embedded_model_loads_quantized_and_answers(backends: dict, mode: str) -> None:
    backend = backends[mode]
    assert backend.quantization == mode and backend.loaded.quantization == mode
    assert backend.model.contextwise_quantization["layers"] == 210  # every linear but the head
    text = _ask(backend, "Name three colors.")
    assert text.strip() and "\ufffd" not in text


@needs_torchao
@pytest.mark.model
def test_embedded_int8_keeps_the_fp32_answer(backends: dict) -> None:
    question = "What is the capital of France?"
    assert "Paris" in _ask(backends["none"], question)
    assert "Paris" in _ask(backends["int8"], question)


@needs_torchao
@pytest.mark.model
def test_embedded_weight_bytes_shrink(backends: dict) -> None:
    size = {m: weight_bytes(b.model) for m, b in backends.items()}
    assert size["int8"] < size["none"] / 3  # fp32 -> int8, tied head int8 too
    assert size["int4"] < size["int8"]


@needs_torchao
@pytest.mark.model
def test_policy_threads_quantization_to_the_loaded_model(backends: dict) -> None:
    from contextwise.backends import build_backend

    from contextwise.policy import Budget

    backend = build_backend(Local(device="cpu", quantization="int8", prefix_cache_mb=0), Budget())
    assert backend.quantization == "int8"
    assert backend.model is backends["int8"].model  # same process-wide loaded copy



# -- quantizing from the checkpoint file, one layer at a time


@needs_torchao
@pytest.mark.parametrize("mode", CPU_MODES)
def test_quantizing_from_the_file_equals_quantizing_the_loaded_model(tmp_path, mode) -> None:
    from contextwise.backends.checkpoint_reader import CheckpointReader
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    plain = quantize(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), mode, "cpu")
    reader = CheckpointReader(tmp_path)
    read = []
    reader.read = lambda name, rows=None, real=reader.read: read.append(name) or real(name, rows)
    streamed = quantize(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), mode, "cpu",
                        weights=reader)
    assert streamed.contextwise_quantization == plain.contextwise_quantization
    # every linear's weight and the (tied) embedding came from the file
    assert len(set(read)) == 2 * 7 + 1 and "model.embed_tokens.weight" in read
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, plain(IDS).logits)


@needs_torchao
def test_a_checkpoint_that_does_not_match_is_read_from_the_model(tmp_path) -> None:
    from contextwise.backends.checkpoint_reader import CheckpointReader
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3),  # wrong shape
               "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128),  # other values
               "model.embed_tokens.weight": torch.zeros(256, 64)},
              tmp_path / "model.safetensors")  # none of them is used
    plain = quantize(tiny_llama(), "int8", "cpu")
    streamed = quantize(tiny_llama(), "int8", "cpu", weights=CheckpointReader(tmp_path))
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, plain(IDS).logits)


def test_int8_rows_in_chunks_equal_int8_rows_at_once(monkeypatch) -> None:
    from contextwise.backends.quantize import Int8Rows

    w = torch.randn(1000, 24)
    whole = Int8Rows(w)
    monkeypatch.setattr(Int8Rows, "CHUNK", 96)
    reads = []
    chunked = Int8Rows(w, lambda i, j: reads.append((i, j)) or w[i:j].clone())
    assert reads[0] == (0, 96) and reads[-1] == (960, 1000) and len(reads) == 11
    assert torch.equal(chunked.qdata, whole.qdata) and torch.equal(chunked.scale, whole.scale)
