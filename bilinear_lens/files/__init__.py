"""The file layer, below every other subpackage: every file and directory name the package
writes (:mod:`.names`), atomic directories and files with the overwrite refusal and the
cleanup of dead writers' temporaries (:mod:`.atomic`), and JSON / safetensors reading and
writing whose errors name the file (:mod:`.serialized`). It imports nothing from the rest of
the package but :mod:`bilinear_lens.locking` (process liveness)."""
