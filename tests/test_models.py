"""The model registry: every family defines what the rest of ftjax reads, and `create` builds it."""

import dataclasses

import pytest
from flax import nnx

from ftjax import models, schema


@pytest.mark.parametrize('arch', sorted(models.FAMILIES))
def test_every_family_defines_the_registry_names(arch):
  family = models.family(arch)
  missing = [name for name in models.REQUIRED if not hasattr(family, name)]
  assert not missing, f'{arch} lacks {missing}'
  assert 'tiny' in family.PRESETS
  assert all(type(cfg) is family.Config for cfg in family.PRESETS.values())
  assert set(family.PEFT_MODULES) == set(family.LORA_TARGETS.values())


def test_create_builds_the_family_of_a_config():
  cfg = models.PRESETS['tiny']
  model = models.create(cfg, seed=0)
  assert isinstance(model, models.family_of(cfg).Model)
  assert models.arch_of(cfg) == 'llama'
  assert models.config_from_dict('llama', dataclasses.asdict(cfg)) == cfg
  assert nnx.state(model, nnx.Param)  # real parameters
  with pytest.raises(KeyError, match="'moe' is not registered"):
    models.family('moe')
  with pytest.raises(TypeError, match='not the Config of a registered model family'):
    models.arch_of(object())


def test_every_architecture_field_is_a_config_key():
  defaults = schema.defaults()
  for family in models.FAMILIES.values():
    for field in dataclasses.fields(family.Config):
      assert field.name in defaults.model
