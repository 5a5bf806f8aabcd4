"""The programs a logged run compiled (sitecustomize.py here), largest first.

  python3 .ci/compile_log/report.py COMPILE_LOG [--min_seconds=5]

One row per program that missed the persistent cache and took at least --min_seconds to
compile: its compile seconds (each compile of it, when two processes compiled it), how many
processes loaded it from the cache, and the test that compiled it first. Then the totals.
"""

import collections
import re
import sys


def main(path: str, min_seconds: float):
  misses, hits, seconds, last_miss = (collections.defaultdict(list), collections.Counter(),
                                      collections.defaultdict(list), {})
  processes = 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.rstrip("\n").split("|", 3)
      if len(parts) != 4:
        continue
      _, pid, test, message = parts
      processes += message.startswith("START ")
      if m := re.match(r"PERSISTENT COMPILATION CACHE MISS for '.*' with key '(.*)'", message):
        misses[m.group(1)].append(test)
        last_miss[pid] = m.group(1)
      elif m := re.match(r"Persistent compilation cache hit for '.*' with key '(.*)'", message):
        hits[m.group(1)] += 1
      elif (m := re.match(r"'.*' took at least .* to compile \(([\d.]+)s\)", message)) and (
          pid in last_miss):
        seconds[last_miss[pid]].append(float(m.group(1)))
  rows = sorted(((sum(s), key) for key, s in seconds.items() if sum(s) >= min_seconds),
                reverse=True)
  print(f"{'seconds':>18}  loads  program (first compiled by)")
  for total, key in rows:
    each = "+".join(f"{s:.0f}" for s in seconds[key])
    print(f"{each:>18}  {hits[key]:5d}  {key[:40]} ({misses[key][0]})")
  print(f"{len(rows)} programs of {min_seconds:g} s or more: {sum(r[0] for r in rows):.0f} s; "
        f"all compiles: {sum(map(sum, seconds.values())):.0f} s; "
        f"compiled twice: {sum(len(s) > 1 for s in seconds.values())}; "
        f"{processes} processes")


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if not a.startswith("--min_seconds=")]
  minimum = [float(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--min_seconds=")]
  if len(args) != 1:
    sys.exit(__doc__)
  main(args[0], minimum[0] if minimum else 5.0)
