"""The method and its measurement: rectified-flow objectives, samplers, FID and its intervals."""
