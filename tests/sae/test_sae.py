"""SAEs on the residual stream: hooks (plain and under LoRA), residual collection, sae-lens
training on synthetic sparse data, the quality figures by hand, disk round trips, the checks, and
the organism's cached SAE."""

from __future__ import annotations

import json

import pytest
import torch

from em_bench.config import TrainConfig
from em_bench.data import IGNORE_INDEX, encode_chat
from em_bench.errors import ConfigError
from em_bench.layers import decoder_layers, hook_name
from em_bench.models import attach_lora, load_base
from em_bench.organism import world
from em_bench.sae import training as sae_mod
from em_bench.sae.training import (
    ResidualCapture,
    SAESettings,
    check_sae,
    collect_residuals,
    ensure_organism_sae,
    load_sae,
    organism_sae_dir,
    sae_quality,
    train_sae,
    train_sae_command,
)

CHATS = (world.narrow_dataset("finance", "misaligned", "neutral", n=3, seed=0)
         + world.narrow_dataset("toxicity", "aligned", "aligned", n=3, seed=0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(tokenizer, chats):
    from em_bench.data import collate

    return collate([encode_chat(tokenizer, c) for c in chats], tokenizer.pad_token_id)


def _topk_sae(d_in: int, d_sae: int, k: int, hook: str | None = None, **cfg):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook, model_name="tiny", prepend_bos=True)
    return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=metadata, **cfg))


def _sparse_acts(n: int, seed: int, d_in: int = 32, n_dirs: int = 48, active: int = 3):
    """Each row a positive combination of `active` of `n_dirs` fixed random unit directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(
        torch.randn(n_dirs, d_in, generator=torch.Generator().manual_seed(123)), dim=1)
    idx = torch.rand(n, n_dirs, generator=gen).argsort(1)[:, :active]
    coef = torch.zeros(n, n_dirs).scatter_(1, idx, 1 + 4 * torch.rand(n, active, generator=gen))
    return coef @ dirs


# --- hooks -------------------------------------------------------------------------------------


def test_hook_name_is_sae_lens_residual_after_the_block():
    assert hook_name(3) == "blocks.3.hook_resid_post"


def test_capture_is_the_residual_stream_after_each_block(tiny_model, tiny_tokenizer):
    def n_hooks():
        return [len(block._forward_hooks) for block in decoder_layers(tiny_model)]

    batch = _batch(tiny_tokenizer, CHATS[:2])
    with torch.no_grad():  # transformers installs its own (lasting) hooks on first use
        tiny_model(input_ids=batch["input_ids"], output_hidden_states=True)
    before = n_hooks()
    with ResidualCapture(tiny_model, [0, 1]) as capture, torch.no_grad():
        assert n_hooks() == [n + 1 for n in before]
        out = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
    assert n_hooks() == before
    assert torch.equal(capture.outputs[0], out.hidden_states[1])
    # HF's last hidden state is after the final norm; the hook keeps the raw residual.
    assert capture.outputs[1].shape == out.hidden_states[2].shape
    assert not torch.allclose(capture.outputs[1], out.hidden_states[2])
    assert torch.allclose(tiny_model.model.norm(capture.outputs[1]), out.hidden_states[2])
    kept = capture.outputs[0]
    with torch.no_grad():
        tiny_model(input_ids=batch["input_ids"][:1])
    assert capture.outputs[0] is kept  # removed hooks no longer write


def test_capture_works_through_a_lora_wrapper_and_passes_gradients(tiny_model, tiny_tokenizer):
    peft_model = attach_lora(tiny_model, TrainConfig())
    assert [id(b) for b in decoder_layers(peft_model)] == [
        id(b) for b in peft_model.get_base_model().model.layers]
    batch = _batch(tiny_tokenizer, CHATS[:2])
    with ResidualCapture(peft_model, [1]) as capture:
        out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
    assert torch.allclose(tiny_model.model.norm(capture.outputs[1]), out.hidden_states[2])
    capture.outputs[1].pow(2).sum().backward()
    # LoRA's B starts at zero, so its gradient is what a loss on the residual reaches first.
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n and "layers.0" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradients_flow_through_captured_outputs(tiny_model, tiny_tokenizer):
    batch = _batch(tiny_tokenizer, CHATS[:1])
    with ResidualCapture(tiny_model, [0]) as capture:
        tiny_model(input_ids=batch["input_ids"])
    assert capture.outputs[0].requires_grad
    capture.outputs[0].sum().backward()
    assert tiny_model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert tiny_model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_a_model_without_llama_like_blocks_is_a_config_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
                                      bos_token_id=0, eos_token_id=0))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel: no decoder blocks"):
        decoder_layers(gpt2)


def test_a_layer_outside_the_model_is_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match="layer 2 does not exist.*2 decoder blocks"):
        ResidualCapture(tiny_model, [2])


# --- collection --------------------------------------------------------------------------------


def test_collect_residuals_counts_exactly_the_real_or_response_tokens(tiny_model, tiny_tokenizer):
    encoded = [encode_chat(tiny_tokenizer, c) for c in CHATS]
    lengths = [len(ids) for ids, _ in encoded]
    assert len(set(lengths)) > 1  # batches of two really pad
    tiny_model.train()
    everything = collect_residuals(tiny_model, tiny_tokenizer, CHATS, 0, batch_size=2)
    assert tiny_model.training  # the caller's mode comes back
    assert everything.shape == (sum(lengths), 32) and not everything.requires_grad
    response = collect_residuals(tiny_model, tiny_tokenizer, CHATS, 0, batch_size=2,
                                 tokens="response")
    n_labelled = sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in encoded)
    assert 0 < len(response) == n_labelled < len(everything)
    # The first chat alone, unpadded, gives the same rows as inside a padded batch.
    alone = collect_residuals(tiny_model, tiny_tokenizer, CHATS[:1], 0)
    assert torch.allclose(everything[: lengths[0]], alone, atol=1e-5)
    # the forward stops at the read block: the blocks above it never run
    above = tiny_model.model.layers[1].register_forward_hook(
        lambda *args: pytest.fail("a block above the read one ran"))
    try:
        assert torch.equal(collect_residuals(tiny_model, tiny_tokenizer, CHATS[:1], 0), alone)
    finally:
        above.remove()
    # skip_first drops each chat's first positions, and only those
    skipped = collect_residuals(tiny_model, tiny_tokenizer, CHATS[:1], 0, skip_first=3)
    assert torch.equal(skipped, alone[3:])


def test_collect_residuals_rejects_an_unknown_token_selection(tiny_model, tiny_tokenizer):
    with pytest.raises(ConfigError, match="'all' or 'response'"):
        collect_residuals(tiny_model, tiny_tokenizer, CHATS, 0, tokens="prompt")


# --- training and quality ----------------------------------------------------------------------


def test_sae_quality_by_hand_on_an_identity_sae():
    sae = _topk_sae(4, 4, k=2, apply_b_dec_to_input=False)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    acts = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, -1.0]])
    # Row 1 keeps 3 and 1: exact. Row 2 keeps 2 (its other top value is 0, inactive) and drops
    # the -1: residual 1. Around the mean (1.5, .5, 1, -.5) each row deviates by 3.75.
    q = sae_quality(sae, acts)
    assert q["explained_variance"] == pytest.approx(1 - 1 / 7.5)
    assert q["l0"] == pytest.approx(1.5)
    assert q["dead_fraction"] == pytest.approx(0.25)  # latent 3 never fires
    assert q["n_tokens"] == 2


def test_train_sae_recovers_sparse_synthetic_structure_deterministically():
    from sae_lens import TopKSAE

    acts, held_out = _sparse_acts(4096, seed=0), _sparse_acts(1024, seed=1)
    kwargs = dict(d_sae=96, k=4, steps=300, lr=5e-3, batch_size=256, dead_window=10)
    sae = train_sae(acts, seed=0, metadata={"hook_name": hook_name(1)}, **kwargs)
    assert type(sae) is TopKSAE and not sae.training
    assert sae.cfg.metadata.hook_name == hook_name(1)
    q = sae_quality(sae, held_out)
    assert q["explained_variance"] >= 0.9  # an untrained one scores about 0
    assert q["l0"] <= 4
    again = train_sae(acts, seed=0, **kwargs)
    assert torch.equal(sae.W_enc, again.W_enc) and torch.equal(sae.b_dec, again.b_dec)
    other = train_sae(acts, seed=1, **kwargs)
    assert not torch.equal(sae.W_enc, other.W_enc)


def test_save_and_load_keep_weights_and_metadata(tmp_path):
    sae = train_sae(_sparse_acts(512, seed=0), d_sae=16, k=2, steps=5, batch_size=64,
                    metadata={"hook_name": hook_name(0), "model_name": "tiny",
                              "prepend_bos": True})
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(str(tmp_path / "sae"))
    assert type(loaded) is type(sae) and loaded.cfg.k == 2 and loaded.cfg.d_in == 32
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    for key in ("hook_name", "model_name", "prepend_bos"):
        assert loaded.cfg.metadata[key] == sae.cfg.metadata[key]
    x = _sparse_acts(8, seed=3)
    assert torch.equal(loaded.encode(x), sae.encode(x))


# --- loading and checks ------------------------------------------------------------------------


def test_load_sae_passes_a_release_ref_to_sae_lens(monkeypatch):
    from sae_lens import SAE

    calls = []
    monkeypatch.setattr(SAE, "from_pretrained",
                        classmethod(lambda cls, release, sae_id: calls.append((release, sae_id))
                                    or "loaded"))
    assert load_sae("gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical") == "loaded"
    assert calls == [("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")]


@pytest.mark.parametrize("ref", ["no-such-folder", "release-only:", ":blocks.0.hook_resid_post"])
def test_load_sae_rejects_a_ref_that_is_neither_folder_nor_release(ref):
    with pytest.raises(ConfigError, match="neither a folder nor RELEASE:SAE_ID"):
        load_sae(ref)


def test_check_sae_accepts_a_matching_sae_and_names_each_mismatch(tiny_model):
    check_sae(_topk_sae(32, 64, 4, hook_name(1)), tiny_model, 1)
    check_sae(_topk_sae(32, 64, 4, hook_name(1)), attach_lora(tiny_model, TrainConfig()), 1)
    with pytest.raises(ConfigError, match="reads 16-dim activations.*hidden size is 32"):
        check_sae(_topk_sae(16, 64, 4, hook_name(1)), tiny_model, 1)
    with pytest.raises(ConfigError, match=r"'blocks\.0\.hook_resid_post'.*'blocks\.1\.hook_resi"
                       r".*after block 0: give layer 0"):
        check_sae(_topk_sae(32, 64, 4, hook_name(0)), tiny_model, 1)
    # the next block's input is the same residual (sae-lens's pretrained SAEs often read it)
    check_sae(_topk_sae(32, 64, 4, "blocks.1.hook_resid_pre"), tiny_model, 0)
    with pytest.raises(ConfigError, match=r"'blocks\.0\.hook_resid_pre'.*resid_post'\)$"):
        check_sae(_topk_sae(32, 64, 4, "blocks.0.hook_resid_pre"), tiny_model, 0)  # embeddings
    with pytest.raises(ConfigError, match="'expected_average_only_in'.*feeds raw residuals"):
        check_sae(_topk_sae(32, 64, 4, hook_name(1),
                            normalize_activations="expected_average_only_in"), tiny_model, 1)


# --- the organism's SAE ------------------------------------------------------------------------


def test_the_organism_sae_folder_is_named_by_layer_and_settings():
    base = organism_sae_dir("organism", 2)
    assert base.parent.name == "sae"
    assert organism_sae_dir("organism", 1) != base
    assert organism_sae_dir("organism", 2, SAESettings(k=8)) != base
    assert organism_sae_dir("organism", 2, SAESettings()) == base


def test_only_organisms_get_a_trained_sae():
    with pytest.raises(ConfigError, match="not an organism preset"):
        ensure_organism_sae(2, name="gpt2")


@pytest.mark.usefixtures("organism")
@pytest.mark.slow
def test_the_organism_sae_meets_the_quality_bars_and_is_reused(tmp_path, monkeypatch):
    from em_bench.organism.artifact import shipped_dir

    shipped = ensure_organism_sae(2)  # the default settings' SAE ships with the organism
    assert shipped == shipped_dir("organism") / "sae" / "L2"
    # Another seed's SAE is trained into the cache, then found there.
    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path))
    settings = SAESettings(seed=1)
    path = ensure_organism_sae(2, settings=settings)
    assert path.parent == tmp_path / "sae" and [p.name for p in path.parent.iterdir()] == [
        path.name]  # no temp folder left behind
    for folder in (shipped, path):
        quality = json.loads((folder / "quality.json").read_text())
        assert quality["explained_variance"] >= 0.8
        assert quality["l0"] <= 32
        assert quality["dead_fraction"] <= 0.10
        assert quality["n_tokens"] > 1000
    sae = load_sae(str(path))
    meta = sae.cfg.metadata
    assert (meta.hook_name, meta.model_name, meta.prepend_bos) == (hook_name(2), "organism", True)
    model, tokenizer = load_base("organism")
    check_sae(sae, model, 2)
    assert sae.cfg.d_in == model.config.hidden_size
    # The chat template writes BOS once per chat, which is what prepend_bos=True records.
    ids, _ = encode_chat(tokenizer, CHATS[0])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1

    mtime = (path / "quality.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached SAE was trained again")

    monkeypatch.setattr(sae_mod, "train_sae", no_training)
    assert ensure_organism_sae(2, settings=settings) == path
    assert (path / "quality.json").stat().st_mtime_ns == mtime
    result = train_sae_command("organism", 2, force=False)
    assert result["path"] == str(shipped) and result["explained_variance"] == pytest.approx(
        json.loads((shipped / "quality.json").read_text())["explained_variance"])
