"""The method and its measurement: models, rectified-flow objectives, samplers, FID and its intervals."""
