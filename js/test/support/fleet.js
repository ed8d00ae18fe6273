// A real relay and two real daemons on loopback: instance js-1 (one) and
// js-2 (two). Binaries from AGENT_LINK_BIN_DIR or ../target/debug. Every
// wait is bounded.
import { spawn, execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const WAIT = 20_000;

function binDir() {
  return process.env.AGENT_LINK_BIN_DIR ?? path.join(REPO, "target", "debug");
}

function waitForLine(child, needle) {
  return new Promise((resolve, reject) => {
    let buf = "";
    const timer = setTimeout(() => reject(new Error(`no line with ${needle}: ${buf}`)), WAIT);
    child.stderr.on("data", (c) => {
      buf += c.toString();
      const line = buf.split("\n").find((l) => l.includes(needle));
      if (line) {
        clearTimeout(timer);
        resolve(line);
      }
    });
    child.on("exit", () => reject(new Error(`exited before ${needle}: ${buf}`)));
  });
}

export async function startFleet() {
  const bins = binDir();
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "agent-link-js-"));
  fs.chmodSync(root, 0o700);
  const procs = [];
  const relayBin = path.join(bins, "agent-link-relay");
  const peerBin = path.join(bins, "agent-link");
  const relayDir = path.join(root, "relay");
  const relay = spawn(relayBin, ["run", "--dir", relayDir, "--listen", "127.0.0.1:0"], { stdio: ["ignore", "ignore", "pipe"] });
  procs.push(relay);
  const line = await waitForLine(relay, "listening on ");
  const addr = line.split("listening on ")[1].split(/\s/)[0];
  const dirs = { one: path.join(root, "one"), two: path.join(root, "two") };
  for (const [name, id] of [["one", "js-1"], ["two", "js-2"]]) {
    const token = execFileSync(relayBin, ["invite", "--dir", relayDir, "--addr", addr, "--instance-id", id], { timeout: WAIT }).toString().trim();
    execFileSync(peerBin, ["init", "--dir", dirs[name], "--instance-id", id, "--join", "-"], { input: token, timeout: WAIT, stdio: ["pipe", "ignore", "pipe"] });
  }
  const daemons = {};
  const startDaemon = async (name) => {
    const d = spawn(peerBin, ["daemon", "--dir", dirs[name]], { stdio: ["ignore", "ignore", "pipe"] });
    procs.push(d);
    await waitForLine(d, "listening on");
    daemons[name] = d;
  };
  await startDaemon("one");
  await startDaemon("two");
  return {
    root,
    dirs,
    stopDaemon: (name) =>
      new Promise((resolve) => {
        daemons[name].once("exit", resolve);
        daemons[name].kill("SIGTERM");
      }),
    close: () => {
      for (const p of procs.reverse()) p.kill("SIGKILL");
      fs.rmSync(root, { recursive: true, force: true });
    },
  };
}
