#!/usr/bin/env bash
# Embeds mailgate's configuration schema (`mailgate config-schema`) in the Helm chart's
# values.schema.json: the `config` property and the definitions it refers to (the chart's
# own definitions start with a lower-case letter, the configuration's with a capital). Run it
# after changing the configuration's types; tests/cli.rs fails while the two differ, and
# Helm then refuses a typo in `config` at install time instead of mailgate at start.
set -euo pipefail
cd "$(dirname "$0")/.."
schema="$(cargo run --quiet -- config-schema)"
MAILGATE_CONFIG_SCHEMA="$schema" python3 - <<'PY'
import json
import os

path = "helm/mailgate/values.schema.json"
with open(path) as f:
    values = json.load(f)
config = json.loads(os.environ["MAILGATE_CONFIG_SCHEMA"])
definitions = config.pop("definitions")
config.pop("$schema")
own = {k: v for k, v in values["definitions"].items() if not k[0].isupper()}
values["definitions"] = {**own, **definitions}
values["properties"]["config"] = config
with open(path, "w") as f:
    json.dump(values, f, indent=2, ensure_ascii=False)
    f.write("\n")
PY
echo "chart-schema: helm/mailgate/values.schema.json now embeds the configuration's schema"
