#!/usr/bin/env python3
"""The command blocks of the docs, for tests/e2e/run.sh step 9.

  docblocks.py extract OUTDIR FILE...
      Writes OUTDIR/index.tsv, one line per command block:
        ID  FILE  LINE  SKIP-REASON-or--  FIRST-COMMAND
      and OUTDIR/ID/NN.cmd (one logical command each, `\\` continuations
      joined, comments and blank lines dropped) plus NN.expect when the
      command ends with the comment `# ok` or `# <integer>`: its expected
      stdout. A command block is a fence of sh, bash, shell, console or no
      language. `<!-- e2e-skip: REASON -->` on the line right before the fence
      marks a block the suite does not run.

  docblocks.py subst CONFIG SELF < IN > OUT
      Applies the path substitution table (tests/e2e/README.md) for node SELF:
      CONFIG is a JSON file {"roots": {node: dir}, "ops": {node: port},
      "etcd": url}. `ssh NODE …` substitutes the rest for NODE; `NODE:/path`
      becomes that node's path.
"""
import json
import os
import re
import sys

COMMAND_LANGS = {"", "sh", "bash", "shell", "console"}
SKIP = re.compile(r"^\s*<!--\s*e2e-skip:\s*(.+?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(```+)\s*([\w-]*)\s*$")
EXPECT = re.compile(r"^(.*?)\s+#\s*(ok|\d+)\s*$", re.S)


def extract(outdir, files):
    os.makedirs(outdir, exist_ok=True)
    index = []
    for path in files:
        lines = open(path, encoding="utf-8").read().split("\n")
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            indent, fence, lang = m.group(1), m.group(2), m.group(3)
            start = i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != fence:
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            i += 1
            if lang not in COMMAND_LANGS:
                continue
            skip = SKIP.match(lines[start - 1]) if start > 0 else None
            bid = "%s-%04d" % (os.path.basename(path).replace(".md", ""), start + 1)
            cmds = commands(body, lang)
            d = os.path.join(outdir, bid)
            os.makedirs(d, exist_ok=True)
            for n, (cmd, expect) in enumerate(cmds, 1):
                with open(os.path.join(d, "%02d.cmd" % n), "w", encoding="utf-8") as f:
                    f.write(cmd + "\n")
                if expect is not None:
                    with open(os.path.join(d, "%02d.expect" % n), "w", encoding="utf-8") as f:
                        f.write(expect + "\n")
            first = cmds[0][0].split("\n")[0] if cmds else ""
            index.append("\t".join([bid, path, str(start + 1), skip.group(1) if skip else "-", first]))
    with open(os.path.join(outdir, "index.tsv"), "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in index))


def commands(body, lang):
    out, cur = [], []
    for line in body:
        if lang == "console":
            if not cur and not line.startswith("$ "):
                continue  # output shown in the block
            line = line[2:] if not cur else line
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur.append(line)
        if line.endswith("\\"):
            continue
        cmd = "\n".join(cur)
        cur = []
        m = EXPECT.match(cmd)
        out.append((cmd, m.group(2)) if m and "\n" not in m.group(2) else (cmd, None))
    if cur:
        out.append(("\n".join(cur), None))
    return out


PATHS = ["/etc/kekd", "/etc/kubernetes", "/etc/systemd/system", "/var/run/kekd", "/root", "/usr/local/bin"]
PATH_RE = re.compile(r"(?<![\w.~-])(" + "|".join(re.escape(p) for p in PATHS) + r")(?=[/\s'\")`;]|$)")
ETCD_RE = re.compile(r"https://(127\.0\.0\.1|10\.0\.0\.1|10\.0\.0\.2):2379")


def subst(text, conf, node):
    roots = conf["roots"]
    ssh = re.match(r"^(ssh\s+)([\w-]+)(\s+)(.*)$", text, re.S)
    if ssh and ssh.group(2) in roots:
        return ssh.group(1) + ssh.group(2) + ssh.group(3) + subst(ssh.group(4), conf, ssh.group(2))
    remote = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(n) for n in roots) + r"):(?=/)")
    parts = []
    pos = 0
    for m in remote.finditer(text):
        parts.append((text[pos:m.start()], node))
        pos = m.end()
        end = re.search(r"[\s;|&]|$", text[pos:]).start() + pos
        parts.append((text[pos:end], m.group(1)))
        pos = end
    parts.append((text[pos:], node))
    out = "".join(PATH_RE.sub(lambda mm: roots[n] + mm.group(1), s) for s, n in parts)
    out = out.replace("127.0.0.1:9464", "127.0.0.1:%s" % conf["ops"][node])
    return ETCD_RE.sub(conf["etcd"], out)


def main():
    if sys.argv[1] == "extract":
        extract(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "subst":
        conf = json.load(open(sys.argv[2], encoding="utf-8"))
        sys.stdout.write(subst(sys.stdin.read(), conf, sys.argv[3]))
    else:
        sys.exit("usage: docblocks.py extract OUTDIR FILE... | subst CONFIG NODE")


if __name__ == "__main__":
    main()
