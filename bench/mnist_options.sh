#!/usr/bin/env bash
# Which of trainer.channels_last / trainer.compile / trainer.precision makes the mnist recipe fastest
# on this machine.
# One rank, 2 epochs of 25,600 MNIST training images; prints samples/s of epoch 2 (after any compile
# warm-up) and the wall time of the whole command. Run on an idle machine:
#   bash bench/mnist_options.sh [MNIST_DIR]
set -euo pipefail
root=${1:-../shared/data/mnist}
tmp=$(mktemp -d)
for combo in "false false 32" "false true 32" "true false 32" "true true 32" "true false bf16-mixed"; do
  read -r cl comp prec <<<"$combo"
  start=$(date +%s.%N)
  rate=$(python -m launcher recipe=mnist "data.root=$root" data.train_limit=25600 data.val_limit=1000 \
      trainer.max_epochs=2 trainer.progress=false trainer.channels_last=$cl trainer.compile=$comp \
      trainer.precision=$prec \
      checkpoint.enabled=false logger=none "run.dir=$tmp/$cl-$comp-$prec" 2>&1 |
      grep -o "epoch 2:.*" | grep -o "samples_per_s=[0-9.e+]*")
  printf 'channels_last=%-5s compile=%-5s precision=%-10s %s  wall %.1f s\n' $cl $comp $prec "$rate" \
      "$(echo "$(date +%s.%N) - $start" | bc)"
done
rm -rf "$tmp"
