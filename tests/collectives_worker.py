"""One process of test_multiprocess's collectives check (run by experiments.launch).

psum_scatter, psum and all_gather over the 4 devices of 2 processes (gloo on
CPU), with chunks from 4 KiB to 2 MiB: a development build of jax returned
wrong psum_scatter chunks above ~256 KiB (jax issue 40830). Every device
contributes values that identify it and the position, so a chunk from the
wrong place, or not summed, differs from NumPy's answer. Prints one line per
size; exits non-zero on the first mismatch.
"""

import sys

import numpy as np


def main(argv):
  flags = dict(arg[2:].split("=", 1) for arg in argv[1:] if arg.startswith("--"))
  from experiments import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(flags["coordinator_address"], int(flags["num_processes"]),
                         int(flags["process_id"]), int(flags["cpu_devices"]))
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  n = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  for chunk_kib in (4, 64, 256, 512, 2048):
    chunk = chunk_kib * 1024 // 4  # float32 entries per output chunk
    # Device d holds row d: d * 1000 + position (exact in float32 below 2**24).
    rows = (np.arange(n)[:, None] * 1000.0 + np.arange(n * chunk)[None, :] % 4096).astype(
        np.float32)
    local = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")),
                                               rows[local[0]:local[-1] + 1])

    def collectives(block):
      block = block[0]
      return (jax.lax.psum_scatter(block, "x", tiled=True)[None],
              jax.lax.psum(block, "x")[None],
              jax.lax.all_gather(block, "x")[None])

    out = jax.jit(jax.shard_map(collectives, mesh=mesh, in_specs=P("x"),
                                out_specs=(P("x"), P("x"), P("x"))))(x)
    total = rows.sum(axis=0)
    for name, array, want in (("psum_scatter", out[0], total.reshape(n, chunk)),
                              ("psum", out[1], np.broadcast_to(total, (n, n * chunk))),
                              ("all_gather", out[2], np.broadcast_to(rows, (n, n, n * chunk)))):
      for shard in array.addressable_shards:
        got = np.asarray(shard.data)[0]
        expected = want[shard.index[0]][0]
        if not np.array_equal(got, expected):
          print(f"{name} with {chunk_kib} KiB chunks: device {shard.device.id} got wrong "
                f"values ({np.mean(got != expected):.1%} of entries differ)", flush=True)
          return 1
    print(f"collectives with {chunk_kib} KiB chunks agree with numpy", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
