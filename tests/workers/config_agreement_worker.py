"""torchrun worker (2 ranks): initialize() compares config fingerprints across ranks; on_rank0 hands
rank 0's result or error to both ranks."""

import os
import sys

from megatron_renio import distributed
from megatron_renio.distributed import ParallelConfig, fingerprint
from megatron_renio.errors import UserInputError
from tests.torchrun_harness import save_rank_result


def main(out_dir):
    rank = int(os.environ["RANK"])
    parallel = ParallelConfig()
    result = {}
    ctx = distributed.initialize(parallel, config_fingerprint=fingerprint(parallel, {"lr": 1.0}))
    result["agree"] = "ok"
    result["dp_size"], result["device"] = ctx.dp_size, ctx.device.type
    result["on_rank0"] = distributed.on_rank0(lambda: {"rank": rank})  # rank 0's value on both ranks

    def fails(error):
        def fn():
            raise error
        return fn

    for name, error in (("user_error", UserInputError("bad flag")), ("crash", ZeroDivisionError("division by zero"))):
        try:
            distributed.on_rank0(fails(error))
            result[name] = "no error"
        except (UserInputError, RuntimeError, ZeroDivisionError) as e:
            result[name] = f"{type(e).__name__}: {e}"
    try:
        distributed.initialize(parallel, config_fingerprint=fingerprint(parallel, {"lr": 1.0 + rank}))
        result["disagree"] = "no error"
    except UserInputError as e:
        result["disagree"] = str(e)
    save_rank_result(out_dir, result)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
