"""`forkrl.models.compat`: the probes of transformers internals answer as the installed release
documents (the cache argument was renamed in 5.24), and the helpers built on them work."""

import pytest
import torch
from packaging.version import Version

from forkrl.models import build_tiny_model, build_tiny_tokenizer, compat

EXPECTED_ARGUMENT = "cache" if compat.TRANSFORMERS_VERSION >= Version("5.24") else "past_key_values"


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(build_tiny_tokenizer(), seed=0)


def test_installed_transformers_is_supported():
    assert compat.TRANSFORMERS_VERSION >= compat.MIN_TRANSFORMERS
    assert compat.cache_layers_missing() is None


def test_cache_argument_of_the_model_and_its_decoder(model):
    assert compat.cache_argument(model) == EXPECTED_ARGUMENT
    assert compat.cache_argument(model.get_decoder()) == EXPECTED_ARGUMENT


def test_cache_argument_of_custom_modules():
    class OldName(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class NoCache(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    assert compat.cache_argument(OldName()) == "past_key_values"
    assert compat.cache_argument(NoCache()) is None
    assert compat.cache_kwargs(OldName(), None) == {}
    assert compat.cache_kwargs(OldName(), "c") == {"past_key_values": "c"}
    with pytest.raises(ValueError, match="NoCache.forward takes no cache argument"):
        compat.cache_kwargs(NoCache(), "c")


def test_the_decoder_fills_a_cache_handed_to_it_and_returns_it(model):
    decoder = model.get_decoder()
    cache = compat.new_cache(compat.DynamicLayer)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = decoder(input_ids=ids, use_cache=True, **compat.cache_kwargs(decoder, cache))
    assert compat.output_cache(out) is cache
    layers = compat.cache_layers(cache)
    assert len(layers) == model.config.num_hidden_layers
    assert cache.get_seq_length() == 4 and layers[0].keys.shape[-2] == 4


def test_fill_layer_holds_the_tensors_without_copying():
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    layer = compat.DynamicLayer()
    compat.fill_layer(layer, keys, values)
    assert layer.is_initialized and layer.keys is keys and layer.values is values
    assert layer.get_seq_length() == 5
    cache = compat.cache_of_layers([layer])
    assert cache.get_seq_length() == 5


def test_activation_checkpointing_and_the_cache_switch(model):
    tiny = build_tiny_model(build_tiny_tokenizer(), seed=0)
    compat.enable_activation_checkpointing(tiny)
    layers = [m for m in tiny.modules() if isinstance(m, compat.GradientCheckpointingLayer)]
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    assert compat.checkpointing_can_keep_cache() == (compat.TRANSFORMERS_VERSION >= Version("5.15"))
    name = "_can_checkpoint_with_cache"
    with compat.cache_kept_under_checkpointing(tiny):
        assert all(getattr(layer, name) is True for layer in layers)
    assert all(name not in layer.__dict__ for layer in layers)  # the class default is back
