set -e
PY=/work/main/.venv/bin/python
OUT=/tmp/legacy
rm -rf $OUT/*
# 1: flow matching MLP on moons (quickstart smoke, 4 steps)
$PY -m scripts.train --config experiments/quickstart.py:smoke=True --workdir $OUT/fm_moons \
  --config.total_steps=4 --config.ckpt_every=4 --config.keep_ckpts=1 --config.model.hidden=16
# 2: shortcut MLP with a teacher EMA (checkpoint item teacher_ema)
$PY -m scripts.train --config experiments/shortcut/moons_mlp.py:smoke=True --workdir $OUT/sc_moons \
  --config.total_steps=4 --config.ckpt_every=4 --config.keep_ckpts=1 --config.model.hidden=16 \
  --config.teacher_ema_decay=0.9 --config.loss.teacher=teacher_ema
for r in fm_moons sc_moons; do
  rm -rf $OUT/$r/tensorboard $OUT/$r/samples
  $PY -m scripts.sample --workdir $OUT/$r --num 16 --batch 16 --seed 3 --out $OUT/$r/expected_ema.npz
  $PY -m scripts.sample --workdir $OUT/$r --num 16 --batch 16 --seed 3 --raw --steps 4 --out $OUT/$r/expected_raw.npz
done
