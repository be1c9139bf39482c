#!/usr/bin/env bash
# Build the TPU image from the repository root and push it, as the seed recipe does:
#   bash docker/tpu/build_and_push_image.sh                 # gcr.io/$PROJECT_ID/$USER-moedpo-tpu-$DATE
#   IMAGE=<my_image> bash docker/tpu/build_and_push_image.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT_ID="${PROJECT_ID:-$(gcloud config get-value project 2>/dev/null)}"
if [[ -z "${IMAGE:-}" && -z "$PROJECT_ID" ]]; then
  echo "set PROJECT_ID (or gcloud config set project ...) or IMAGE" >&2
  exit 2
fi
IMAGE="${IMAGE:-gcr.io/${PROJECT_ID}/${USER:-moedpo}-moedpo-tpu-$(date +%Y%m%d)}"
docker build -f docker/tpu/Dockerfile -t "$IMAGE" .
docker push "$IMAGE"
echo "pushed $IMAGE"
