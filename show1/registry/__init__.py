"""The MLflow Model Registry side of show1: stage models `<prefix>-<stage>` with aliases challenger/champion.

register.py   log a stage folder as a pyfunc model and register it (idempotent by content hash)
stage_model.py the pyfunc: the stage pipeline behind `predict`
promote.py    the promotion gate (evaluation metrics vs the champion), recorded as version tags
resolve.py    `--from-registry` references → stage folders → the cascade
lineage.py    video → generation run → model versions → training runs → data, commit, params
"""
