#!/bin/sh
# How tests/browser/sample.mp4 was made (Debian's ffmpeg): two seconds of a test pattern, 160x90,
# H.264 in MP4 with its index first, so a browser can play it from the first bytes.
set -eu
cd "$(dirname "$0")"
ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc=duration=2:size=160x90:rate=12 \
    -c:v libx264 -pix_fmt yuv420p -profile:v baseline -movflags +faststart -bitexact \
    -map_metadata -1 sample.mp4
