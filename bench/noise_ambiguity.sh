#!/usr/bin/env bash
# Description ambiguity per noise scale (bench/noise.md, "Corpus side"): a 12-scene x 3-view sample world, strict
# sim builds with the verifier (the rewrite needs it), default rates, then `gr3d audit`; prints one line per build
# from audit.json's rewrite.ambiguity. Usage: bench/noise_ambiguity.sh WORKDIR   (counts, not timings)
set -euo pipefail
W=${1:?usage: $0 WORKDIR}
PY=${PY:-.venv/bin/python}
mkdir -p "$W"
[ -f "$W/world/ground_truth.json" ] || $PY -m pipelines.cli sample-world --out "$W/world" --scenes 12 --views 3 --seed 0 >/dev/null
# noise scale, --rewrite, --sim-ambiguous-rewrite (the last row: the most ambiguity the sim can inject here)
for spec in "0 generic 0.1" "1 generic 0.1" "2 generic 0.1" "4 generic 0.1" "0 all 0.1" "1 all 0.1" "2 all 0.1" \
            "4 all 0.1" "1 all 1.0"; do
  set -- $spec
  out="$W/cot_s$1_$2"
  [ "$3" = "0.1" ] || out="${out}_amb$3"
  [ -f "$out/manifest.json" ] || $PY -m pipelines.cli build cot --out "$out" --data-root "$W/world" \
      --refspatial RefSpatial/3D/reasoning_template_qa.json RefSpatial/3D/choice_qa.json \
      --tagger sim --verifier sim --noise-scale "$1" --rewrite "$2" --sim-ambiguous-rewrite "$3" --executor local --quiet >/dev/null
  $PY -m pipelines.cli audit "$out" --out "$out/audit" --gallery 0 --error-gallery 0 >/dev/null
  $PY - "$out/audit/audit.json" "$1" "$2 (ambiguous-rewrite $3)" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1])); a = d["rewrite"]["ambiguity"]
pct = lambda x: f"{100 * x:.1f}%"
ci = lambda c: f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"
src = "; ".join(f"{k}: {v['n_ambiguous']}+{v['n_misdescribed']}/{v['n']}" for k, v in a["by_source"].items())
inj = a["by_injection"] or {}
n_inj = sum(v["n_unique"] + v["n_ambiguous"] + v["n_misdescribed"] for k, v in inj.items() if k != "none")
print(f"scale {sys.argv[2]} rewrite {sys.argv[3]}: n {a['n']}  confusable {a['n_confusable']}  ambiguous {a['n_ambiguous']} {pct(a['ambiguous_share'])} "
      f"{ci(a['ambiguous_ci'])}  misdescribed {a['n_misdescribed']}  not unique {pct(a['not_unique_share'])} "
      f"{ci(a['not_unique_ci'])}  injected {n_inj}  by source: {src}")
PYEOF
done
