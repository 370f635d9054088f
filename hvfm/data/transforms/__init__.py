"""Transforms: pixels from decoded frames to the model's input -- `host` (torch on the CPU: crop box,
resize, CLIP normalisation) and `device` (uint8 frames + crop rows from the workers, cropped, resized
and normalised on the training device)."""
