import { test } from "node:test";
import assert from "node:assert/strict";

import { AgentLink, AgentLinkError } from "../index.js";
import { startFleet } from "./support/fleet.js";

test("send, receive with onMessage, inbox, recv, ack, status — against real daemons", async (t) => {
  const fleet = await startFleet();
  t.after(() => fleet.close());
  const bob = new AgentLink({ agentId: "xiaobaozi", dir: fleet.dirs.two });
  await bob.register();
  const alice = new AgentLink({ agentId: "xiaodingding", configPath: `${fleet.dirs.one}/agent-link-config.json` });
  const r = await alice.send("js-2/xiaobaozi", "你好");
  assert.equal(r.to, "js-2/xiaobaozi");
  assert.equal(r.id.length, 32);
  assert.ok(r.deliveredAt > 0);
  const r2 = await alice.send("xiaobaozi", Buffer.from([0xff, 0x00]));
  assert.equal(r2.to, "js-2/xiaobaozi", "a bare name resolves");
  const waiting = await bob.inbox();
  assert.deepEqual(waiting.map((m) => m.id), [r.id, r2.id]);

  const got = [];
  let done;
  const all = new Promise((resolve) => (done = resolve));
  await bob.onMessage(async (msg) => {
    got.push(msg);
    if (got.length === 3) done();
  });
  await alice.send("js-2/xiaobaozi", "live");
  await Promise.race([all, new Promise((_, rej) => setTimeout(() => rej(new Error("timeout")), 20_000))]);
  await bob.close();
  assert.equal(got[0].from, "js-1/xiaodingding");
  assert.equal(got[0].message, "你好");
  assert.deepEqual([...got[1].data], [0xff, 0x00]);
  assert.equal(got[2].message, "live");
  // Acked once handled (the last ack may still be on its way).
  for (let i = 0; i < 100 && (await bob.inbox()).length > 0; i++) await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(await bob.inbox(), []);

  assert.equal(await bob.recv({ wait: 1 }), null);
  const r3 = await alice.send("js-2/xiaobaozi", "later");
  const m = await bob.recv({ wait: 5 });
  assert.equal(m.id, r3.id);
  const st = await bob.status();
  assert.equal(st.daemon, true);
  assert.equal(st.instance_id, "js-2");
});

test("errors carry the CLI's code and exit code", async (t) => {
  const fleet = await startFleet();
  t.after(() => fleet.close());
  const alice = new AgentLink({ agentId: "alice", dir: fleet.dirs.one });
  await assert.rejects(alice.send("js-2/nobody", "x"), (e) => e instanceof AgentLinkError && e.code === "TargetOffline" && e.exitCode === 3);
  await assert.rejects(alice.send("nobody", "x"), (e) => e.code === "UnknownTarget");
  await assert.rejects(alice.send("a/b/c", "x"), (e) => e.code === "BadAddress" && e.exitCode === 2);
  await assert.rejects(alice.send("js-2/nobody", "x".repeat(2 * 1024 * 1024)), (e) => e.code === "TooLarge");
  await assert.rejects(new AgentLink({ agentId: "ghost", dir: fleet.dirs.two }).inbox(), (e) => e.code === "UnknownAgent");
  await fleet.stopDaemon("one");
  await assert.rejects(alice.send("js-2/bob", "x"), (e) => e.code === "DaemonNotRunning" && /agent-link daemon --dir/.test(e.message));
});
