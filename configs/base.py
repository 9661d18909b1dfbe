"""Every config key of ftjax with its default. Experiment configs import this and override a few.

  ftjax train --config configs/base.py --config.data.path=train.jsonl --workdir /tmp/run

The schema itself (each key, its default and a comment on what it means) is `ftjax/schema.py`;
docs/configuration.md explains every section.
"""

import ml_collections

from ftjax import schema


def get_config() -> ml_collections.ConfigDict:
  return schema.defaults()
