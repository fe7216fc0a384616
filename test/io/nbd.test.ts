import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { NbdConnectionError, NbdProtocolError, NbdServerError, InvalidArgumentError } from '../../src/errors.js';
import { BASE_ALLOCATION, NbdClient, isNbdUri, parseNbdUri, type NbdExtent } from '../../src/io/nbd.js';
import { qemuImg, qemuIo, run, tempDir } from '../helpers/qemu.js';
import { chunk, hasNbdinfo, hasOpenssl, makeCertificates, needQemuNbd, optionReply, startFakeServer, startQemuNbd, u16, u32, u64, type FakeBehaviour } from '../helpers/nbd.js';

const MiB = 1024 * 1024;

test('NBD URIs: the forms of the NBD URI spec, and what is refused', () => {
  assert.deepEqual(parseNbdUri('nbd://example.com/disk0'), { uri: 'nbd://example.com/disk0', transport: 'tcp', host: 'example.com', port: 10809, exportName: 'disk0', tls: false });
  assert.equal(parseNbdUri('nbd://127.0.0.1:10900').port, 10900);
  assert.equal(parseNbdUri('nbd://127.0.0.1:10900').exportName, '');
  assert.equal(parseNbdUri('nbd://[::1]:5/a%20b').host, '::1');
  assert.equal(parseNbdUri('nbd://[::1]:5/a%20b').exportName, 'a b');
  const unix = parseNbdUri('nbds+unix:///vda?socket=/run/x.sock&tls-certificates=/pki&tls-hostname=backup');
  assert.equal(unix.transport, 'unix');
  assert.equal(unix.socket, '/run/x.sock');
  assert.equal(unix.exportName, 'vda');
  assert.equal(unix.tls, true);
  assert.equal(unix.tlsCertificates, '/pki');
  assert.equal(unix.tlsHostname, 'backup');
  assert.equal(isNbdUri('NBD+UNIX:///?socket=x'), true);
  assert.equal(isNbdUri('disk.raw'), false);
  assert.equal(isNbdUri('nbdfoo://x'), false);
  for (const bad of ['nbd+unix:///x', 'nbd+unix://host/x?socket=/s', 'nbd:///x', 'nbd://u:p@h/x', 'nbd://h/%zz', 'nbd://h:99999/x']) {
    assert.throws(() => parseNbdUri(bad), InvalidArgumentError, bad);
  }
});

/** A qcow2 with data, a zeroed range and a persistent bitmap b0 recording later writes. */
function bitmapImage(dir: string): string {
  const image = join(dir, 'd.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', image, '64M']);
  assert.equal(qemuIo(['-c', 'write -P 0xaa 0 1M', '-c', 'write -z 1M 1M', image]).code, 0);
  assert.equal(qemuImg(['bitmap', '--add', image, 'b0']).code, 0);
  assert.equal(qemuIo(['-c', 'write -P 0xbb 8M 128K', '-c', 'write -P 0xcc 0 64K', image]).code, 0);
  return image;
}

/** nbdinfo --map as extents, the oracle for block status. */
function nbdinfoMap(uri: string, context = BASE_ALLOCATION): NbdExtent[] {
  const r = run('nbdinfo', ['--json', `--map=${context}`, uri]);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number }>).map((e) => ({ offset: e.offset, length: e.length, flags: e.type }));
}

test('NBD client against qemu-nbd on a Unix socket: negotiation, block status of both contexts, reads with holes', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const image = bitmapImage(dir);
  const server = await startQemuNbd(t, dir, image, { format: 'qcow2', bitmap: 'b0' });
  const client = await NbdClient.connect(server.uri, { metaContexts: [BASE_ALLOCATION, 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:nope'] });
  t.after(() => client.close());
  assert.equal(client.size, 64 * MiB);
  assert.equal(client.structuredReplies, true);
  assert.equal(client.extendedHeaders, false); // qemu 7.2 answers NBD_REP_ERR_UNSUP
  assert.deepEqual([...client.contexts.keys()].sort(), [BASE_ALLOCATION, 'qemu:dirty-bitmap:b0']);
  assert.ok(client.blockSize.maximum >= MiB);

  const status = await client.blockStatus(0, client.size);
  assert.deepEqual(status.get(BASE_ALLOCATION), [
    { offset: 0, length: MiB, flags: 0 },
    { offset: MiB, length: 7 * MiB, flags: 3 },
    { offset: 8 * MiB, length: 128 * 1024, flags: 0 },
    { offset: 8 * MiB + 128 * 1024, length: 56 * MiB - 128 * 1024, flags: 3 },
  ]);
  assert.deepEqual(status.get('qemu:dirty-bitmap:b0'), [
    { offset: 0, length: 65536, flags: 1 },
    { offset: 65536, length: 8 * MiB - 65536, flags: 0 },
    { offset: 8 * MiB, length: 128 * 1024, flags: 1 },
    { offset: 8 * MiB + 128 * 1024, length: 56 * MiB - 128 * 1024, flags: 0 },
  ]);
  if (hasNbdinfo) {
    assert.deepEqual(status.get(BASE_ALLOCATION), nbdinfoMap(server.uri));
    assert.deepEqual(status.get('qemu:dirty-bitmap:b0'), nbdinfoMap(server.uri, 'qemu:dirty-bitmap:b0'));
  }

  // A 2 MiB read: 1 MiB of data, then a hole the server does not send.
  const buffer = Buffer.alloc(2 * MiB, 0x55);
  const result = await client.read(0, 2 * MiB, buffer);
  assert.deepEqual(result.holes, [[MiB, 2 * MiB]]);
  assert.equal(buffer[0], 0xcc);
  assert.equal(buffer[65536], 0xaa);
  assert.equal(buffer[MiB], 0x55, 'hole bytes are not written');
  assert.equal(client.stats.dataBytes, MiB);
  assert.equal(client.stats.holeBytes, MiB);
  // Several requests in flight, answered by cookie.
  const targets = Array.from({ length: 8 }, () => Buffer.alloc(65536));
  await Promise.all(targets.map((b, i) => client.read(8 * MiB + (i % 2) * 65536, 65536, b)));
  assert.ok(targets.every((b) => b[0] === 0xbb && b[65535] === 0xbb));
  await assert.rejects(async () => client.read(client.size, 512, Buffer.alloc(512)), InvalidArgumentError);
});

test('NBD client over TCP on 127.0.0.1 with a named export', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const raw = join(dir, 'r.raw');
  const bytes = randomBytes(3 * MiB);
  (await import('node:fs')).writeFileSync(raw, bytes);
  const server = await startQemuNbd(t, dir, raw, { format: 'raw', tcp: true, exportName: 'disk one' });
  assert.match(server.uri, /^nbd:\/\/127\.0\.0\.1:\d+\/disk%20one$/);
  const client = await NbdClient.connect(server.uri, { metaContexts: [BASE_ALLOCATION] });
  const buffer = Buffer.alloc(3 * MiB);
  await Promise.all([0, 1, 2].map((i) => client.read(i * MiB, MiB, buffer, i * MiB)));
  assert.ok(buffer.equals(bytes));
  await client.close();
  // A wrong export name is the server's refusal, naming the URI.
  const wrong = server.uri.replace(/disk%20one$/, 'nope');
  await assert.rejects(NbdClient.connect(wrong), (err: unknown) => err instanceof NbdServerError && err.errno === 'NBD_REP_ERR_UNKNOWN' && err.message.includes(wrong) && /no export named 'nope'/.test(err.message));
});

test('NBD TLS: STARTTLS against qemu-nbd with x509 certificates (client certificate checked)', async (t) => {
  if (!needQemuNbd(t)) return;
  if (!hasOpenssl) return t.skip('openssl not installed');
  const dir = tempDir(t);
  const certs = makeCertificates(dir);
  const raw = join(dir, 'r.raw');
  const bytes = randomBytes(MiB);
  (await import('node:fs')).writeFileSync(raw, bytes);
  const tlsArgs = ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${certs.serverDir},verify-peer=on`, '--tls-creds', 'tls0'];
  const tcp = await startQemuNbd(t, dir, raw, { format: 'raw', tcp: true, args: tlsArgs, scheme: 'nbds', query: `tls-certificates=${encodeURIComponent(certs.clientDir)}` });
  const client = await NbdClient.connect(tcp.uri, { metaContexts: [BASE_ALLOCATION] });
  assert.equal(client.tls, true);
  const buffer = Buffer.alloc(MiB);
  await client.read(0, MiB, buffer);
  assert.ok(buffer.equals(bytes));
  assert.ok(client.contexts.has(BASE_ALLOCATION));
  // A sibling connection (several readers) negotiates TLS the same way.
  const sibling = await client.connectSibling();
  assert.equal(sibling.tls, true);
  const again = Buffer.alloc(MiB);
  await sibling.read(0, MiB, again);
  assert.ok(again.equals(bytes));
  await sibling.close();
  await client.close();

  // Files given one by one, over a Unix socket (the certificate's name is then localhost).
  const unix = await startQemuNbd(t, dir, raw, { format: 'raw', args: tlsArgs, scheme: 'nbds' });
  const pki = certs.clientDir;
  const viaFiles = await NbdClient.connect(unix.uri, { tls: { ca: join(pki, 'ca-cert.pem'), cert: join(pki, 'client-cert.pem'), key: join(pki, 'client-key.pem') } });
  assert.equal(viaFiles.tls, true);
  await viaFiles.close();

  // Plain NBD to a TLS-only server: refused with a hint, not a hang.
  const plain = tcp.uri.replace(/^nbds:/, 'nbd:').replace(/\?.*$/, '');
  await assert.rejects(NbdClient.connect(plain), (err: unknown) => err instanceof NbdServerError && err.errno === 'NBD_REP_ERR_TLS_REQD' && err.hint !== undefined);
  // A server certificate from another CA: the handshake fails, typed and naming the URI.
  await assert.rejects(NbdClient.connect(tcp.uri, { tls: { ca: certs.otherCa } }), (err: unknown) => err instanceof NbdConnectionError && err.message.includes(tcp.uri));
  // The wrong host name in the certificate check.
  await assert.rejects(NbdClient.connect(tcp.uri, { tls: { hostname: 'elsewhere.example' } }), NbdConnectionError);
  // No CA at all: refused before connecting.
  await assert.rejects(NbdClient.connect(plain.replace(/^nbd:/, 'nbds:')), InvalidArgumentError);
});

test('NBD client: extended headers (64-bit replies) and simple replies, against our fake server', async (t) => {
  const dir = tempDir(t);
  const disk = Buffer.alloc(4 * 65536);
  randomBytes(65536).copy(disk, 0);
  randomBytes(65536).copy(disk, 3 * 65536);
  const extended = await startFakeServer(t, dir, disk, { extendedHeaders: true });
  const client = await NbdClient.connect(extended.uri, { metaContexts: [BASE_ALLOCATION, 'qemu:dirty-bitmap:b0'] });
  assert.equal(client.extendedHeaders, true);
  assert.equal(client.blockSize.maximum, MiB);
  const status = await client.blockStatus(0, disk.length);
  assert.deepEqual(status.get(BASE_ALLOCATION)!.map((e) => e.flags), [0, 3, 3, 0]);
  assert.deepEqual(status.get('qemu:dirty-bitmap:b0')!.map((e) => e.flags), [1, 0, 1, 0]);
  const buffer = Buffer.alloc(disk.length);
  await client.read(0, disk.length, buffer);
  assert.ok(buffer.equals(disk));
  await client.close();
  assert.equal(extended.disconnects, 1, 'close() sends NBD_CMD_DISC');

  const simple = await startFakeServer(t, dir, disk, { noStructured: true });
  const old = await NbdClient.connect(simple.uri, { metaContexts: [BASE_ALLOCATION] });
  assert.equal(old.structuredReplies, false);
  assert.equal(old.contexts.size, 0);
  buffer.fill(0);
  await old.read(65536, 3 * 65536, buffer, 65536);
  assert.ok(buffer.subarray(65536).equals(disk.subarray(65536)));
  await old.close();
  // A bitmap is required but the server cannot publish any.
  await assert.rejects(
    NbdClient.connect(simple.uri, { metaContexts: ['qemu:dirty-bitmap:b0'], requiredContexts: ['qemu:dirty-bitmap:b0'] }),
    (err: unknown) => err instanceof NbdServerError && /does not publish the dirty bitmap 'b0'/.test(err.message),
  );
});

/** Connects to a fake server with `behaviour` and does one read; returns what it threw. */
async function hostile(t: TestContext, behaviour: FakeBehaviour, options: { timeout?: number; blockStatus?: boolean } = {}): Promise<unknown> {
  const dir = tempDir(t);
  const server = await startFakeServer(t, dir, Buffer.alloc(4 * 65536, 1), behaviour);
  const before = process.memoryUsage().arrayBuffers;
  try {
    const client = await NbdClient.connect(server.uri, { metaContexts: [BASE_ALLOCATION], timeout: options.timeout ?? 5000 });
    try {
      if (options.blockStatus) await client.blockStatus(0, 65536);
      else await client.read(0, 65536, Buffer.alloc(65536));
    } finally {
      await client.close();
    }
  } catch (err) {
    // Nothing the server claimed drove an allocation.
    assert.ok(process.memoryUsage().arrayBuffers - before < 32 * MiB, 'bounded memory');
    return err;
  }
  return undefined;
}

const protocolError = (pattern: RegExp) => (err: unknown) => {
  assert.ok(err instanceof NbdProtocolError, `expected NbdProtocolError, got ${String(err)}`);
  assert.match(err.message, pattern);
  assert.match(err.message, /nbd\+unix:\/\//);
  return true;
};

test('hostile NBD servers: bad magic, bad lengths, oversized chunks, chunks out of range → typed errors', async (t) => {
  const check = async (behaviour: FakeBehaviour, pattern: RegExp, options?: { blockStatus?: boolean }) => protocolError(pattern)(await hostile(t, behaviour, options));

  await check({ greeting: Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n') }, /NBD magic/);
  await check({ greeting: Buffer.concat([Buffer.from('NBDMAGIC'), u64(0x00420281861253n), u64(1 << 20), u32(0)]) }, /oldstyle/);
  // An option reply claiming 2 GiB.
  await check({ onOption: (s, o) => (o === 8 ? (s.write(Buffer.concat([u64(0x3e889045565a9n), u32(8), u32(1), u32(0x7fffffff)])), true) : false) }, /option reply of 2147483647 bytes/);
  await check({ onOption: (s, o) => (o === 8 ? (s.write(optionReply(9, 1)), true) : false) }, /answered option 9/);
  // Transmission: a reply with a bad magic, a data chunk claiming 4 GiB, a block status of 1 GiB.
  await check({ onCommand: (s) => (s.write(Buffer.alloc(32, 0x41)), true) }, /bad magic 0x41414141/);
  await check({ onCommand: (s, c) => (s.write(chunk(c, 1, 1, Buffer.alloc(0), 0xffffffff)), true) }, /data chunk of 4294967295 bytes/);
  await check({ onCommand: (s, c) => (s.write(chunk(c, 1, 5, Buffer.alloc(0), 2 ** 30)), true) }, /block status chunk of 1073741824 bytes/, { blockStatus: true });
  await check({ onCommand: (s, c) => (s.write(chunk(c, 1, 2, Buffer.concat([u64(c.offset + 65536), u32(512)]))), true) }, /hole chunk .* outside the read/);
  await check(
    { onCommand: (s, c) => (s.write(Buffer.concat([chunk(c, 0, 2, Buffer.concat([u64(0), u32(65536)])), chunk(c, 1, 2, Buffer.concat([u64(4096), u32(512)]))])), true) },
    /overlapping hole chunks/,
  );
  await check({ onCommand: (s, c) => (s.write(chunk(c, 1, 2, Buffer.concat([u64(0), u32(4096)]))), true) }, /answered a read of 65536 bytes with 4096/);
  await check({ onCommand: (s, c) => (s.write(chunk({ ...c, cookie: c.cookie + 99n }, 1, 0, Buffer.alloc(0))), true) }, /not pending/);
  await check({ onCommand: (s, c) => (s.write(chunk(c, 1, 77, Buffer.alloc(0))), true) }, /unknown reply chunk type 77/);
  await check({ onCommand: (s, c) => (s.write(chunk(c, 1, 5, Buffer.concat([u32(1), u32(0), u32(0)]))), true) }, /extent of 0 bytes/, { blockStatus: true });
  await check({ onCommand: (s, c) => (s.write(chunk(c, 1, 5, Buffer.concat([u32(42), u32(512), u32(0)]))), true) }, /meta context 42/, { blockStatus: true });
  await check({ onOption: (s, o) => (o === 7 ? (s.write(optionReply(7, 3, Buffer.concat([u16(0), u64(2n ** 60n), u16(1)]))), s.write(optionReply(7, 1)), true) : false) }, /beyond 2\^53/);
  await check({ onOption: (s, o) => (o === 7 ? (s.write(optionReply(7, 3, Buffer.concat([u16(3), u32(3), u32(4096), u32(65536)]))), s.write(optionReply(7, 1)), true) : false) }, /impossible block-size/);
});

test('hostile NBD servers: error chunks, stalls and a vanished server → typed errors, never a hang', async (t) => {
  // An error chunk with a message: a server error for that request; the connection stays usable.
  const dir = tempDir(t);
  let fail = true;
  const server = await startFakeServer(t, dir, Buffer.alloc(4 * 65536, 7), {
    onCommand: (s, c) => {
      if (!fail) return false;
      fail = false;
      const text = Buffer.from('disk\x1b[31mfailed');
      s.write(chunk(c, 1, 0x8001, Buffer.concat([u32(5), u16(text.length), text])));
      return true;
    },
  });
  const client = await NbdClient.connect(server.uri);
  await assert.rejects(client.read(0, 65536, Buffer.alloc(65536)), (err: unknown) => err instanceof NbdServerError && err.errno === 'EIO' && !err.message.includes('\x1b'));
  const again = Buffer.alloc(65536);
  await client.read(0, 65536, again);
  assert.equal(again[100], 7);
  await client.close();

  // A server that accepts the request and then says nothing: the timeout fails it.
  const stalled = await hostile(t, { onCommand: () => true }, { timeout: 300 });
  assert.ok(stalled instanceof NbdConnectionError && /sent nothing for 0.3 s/.test(stalled.message), String(stalled));
  // A server that stalls in the middle of the handshake.
  const mute = await hostile(t, { onOption: () => true }, { timeout: 300 });
  assert.ok(mute instanceof NbdConnectionError, String(mute));
  // A server that hangs up half-way through a data chunk.
  const gone = await hostile(t, { onCommand: (s, c) => (s.end(chunk(c, 1, 1, Buffer.concat([u64(0), Buffer.alloc(100)]), 8 + 65536)), true) });
  assert.ok(gone instanceof NbdConnectionError && /closed the connection/.test(gone.message), String(gone));
  // Nobody listening.
  const nobody = 'nbd+unix:///?socket=' + encodeURIComponent(join(dir, 'none.sock'));
  await assert.rejects(NbdClient.connect(nobody), (err: unknown) => err instanceof NbdConnectionError && err.uri === nobody && err.message.includes(nobody));
});

/** Writes `bytes` in pieces of the given sizes (cycled), each in its own turn of the event loop. */
function writeInPieces(socket: import('node:net').Socket, bytes: Buffer, sizes: number[]): Promise<void> {
  return new Promise((resolve) => {
    let at = 0;
    let i = 0;
    const next = () => {
      if (at >= bytes.length) return resolve();
      const n = sizes[i++ % sizes.length]!;
      socket.write(bytes.subarray(at, at + n));
      at += n;
      setImmediate(next);
    };
    next();
  });
}

test('NBD client: replies arriving in odd pieces land in place (scratch and in-place reads), nothing outside the target', async (t) => {
  const dir = tempDir(t);
  const disk = randomBytes(4 * MiB);
  // Replies one after another (two reads are pending at once), each cut into pieces from 1 byte
  // to 100 KB: headers split across reads, data starting in the scratch buffer and going on in place.
  let queue = Promise.resolve();
  const server = await startFakeServer(t, dir, disk, {
    maxBlock: 4 * MiB,
    onCommand: (s, c) => {
      if (c.type !== 0) return false;
      const half = c.length / 2;
      // Two data chunks per read, the second half first.
      const reply = Buffer.concat([
        chunk(c, 0, 1, Buffer.concat([u64(c.offset + half), disk.subarray(c.offset + half, c.offset + c.length)])),
        chunk(c, 1, 1, Buffer.concat([u64(c.offset), disk.subarray(c.offset, c.offset + half)])),
      ]);
      queue = queue.then(() => writeInPieces(s, reply, [1, 3, 20, 7, 4096, 100_000, 33_000, 65_536, 31_999, 250_000]));
      return true;
    },
  });
  const client = await NbdClient.connect(server.uri);
  const target = Buffer.alloc(4 * MiB + 8192, 0xee);
  await Promise.all([client.read(0, 2 * MiB, target, 4096), client.read(2 * MiB, 2 * MiB, target, 4096 + 2 * MiB)]);
  assert.ok(target.subarray(4096, 4096 + 4 * MiB).equals(disk));
  assert.ok(target.subarray(0, 4096).every((b) => b === 0xee) && target.subarray(4096 + 4 * MiB).every((b) => b === 0xee));
  assert.equal(client.stats.dataBytes, 4 * MiB);
  // Small reads (under the in-place threshold) through the same connection.
  const small = Buffer.alloc(1000);
  await client.read(12345, 1000, small);
  assert.ok(small.equals(disk.subarray(12345, 13345)));
  await client.close();
});

test('hostile NBD servers through the in-place receive path: more bytes than announced, oversized chunks → typed errors, the target\'s neighbours untouched, bounded memory', async (t) => {
  const dir = tempDir(t);
  const disk = Buffer.alloc(4 * MiB, 1);
  const read = async (behaviour: FakeBehaviour): Promise<{ error: unknown; target: Buffer }> => {
    const server = await startFakeServer(t, dir, disk, { maxBlock: 4 * MiB, ...behaviour });
    const client = await NbdClient.connect(server.uri, { timeout: 5000 });
    const target = Buffer.alloc(MiB + 8192, 0xee);
    const before = process.memoryUsage().arrayBuffers;
    const error = await client.read(0, MiB, target, 4096).then(
      () => undefined,
      (err: unknown) => err,
    );
    assert.ok(process.memoryUsage().arrayBuffers - before < 32 * MiB, 'bounded memory');
    await client.close();
    return { error, target };
  };
  const guardsIntact = (target: Buffer) => target.subarray(0, 4096).every((b) => b === 0xee) && target.subarray(4096 + MiB).every((b) => b === 0xee);

  // The whole read as one chunk, then 256 KiB nobody announced (read as the next header).
  const extra = await read({ onCommand: (s, c) => (s.write(Buffer.concat([chunk(c, 0, 1, Buffer.concat([u64(c.offset), Buffer.alloc(c.length, 0x41)])), Buffer.alloc(256 * 1024, 0x41)])), true) });
  assert.ok(protocolError(/bad magic 0x41414141/)(extra.error));
  assert.ok(guardsIntact(extra.target), 'nothing landed outside the target range');
  // A chunk announcing one byte more than the read, followed by that many bytes: refused before any lands.
  const over = await read({ onCommand: (s, c) => (s.write(chunk(c, 1, 1, Buffer.concat([u64(c.offset), Buffer.alloc(c.length + 1, 0x42)]))), true) });
  assert.ok(protocolError(/data chunk of 1048585 bytes for a read of 1048576/)(over.error));
  assert.ok(over.target.every((b) => b === 0xee), 'no byte of a refused chunk was stored');
  // A chunk claiming 2 GiB, then a stream of bytes.
  const huge = await read({ onCommand: (s, c) => (s.write(Buffer.concat([chunk(c, 1, 1, Buffer.alloc(0), 2 ** 31), Buffer.alloc(MiB, 0x43)])), true) });
  assert.ok(protocolError(/data chunk of 2147483648 bytes/)(huge.error));
  assert.ok(huge.target.every((b) => b === 0xee));
  // A chunk placed past the end of the read (its data would run off the target).
  const past = await read({ onCommand: (s, c) => (s.write(chunk(c, 1, 1, Buffer.concat([u64(c.offset + 4096), Buffer.alloc(c.length, 0x44)]))), true) });
  assert.ok(protocolError(/data chunk \[4096, \+1048576\) outside the read/)(past.error));
  assert.ok(past.target.every((b) => b === 0xee));
});

test('NBD connect: cancelled by its signal, before or during negotiation (typed, no hang)', async (t) => {
  const dir = tempDir(t);
  let sawOption!: () => void;
  const optionSeen = new Promise<void>((resolve) => (sawOption = resolve));
  // A server that takes options and never answers: only the signal can end the attempt (the timeout is 10 min).
  const mute = await startFakeServer(t, dir, Buffer.alloc(65536), {
    onOption: () => {
      sawOption();
      return true;
    },
  });
  const controller = new AbortController();
  const connecting = NbdClient.connect(mute.uri, { signal: controller.signal, timeout: 600_000 });
  await optionSeen;
  controller.abort();
  await assert.rejects(connecting, (err: unknown) => err instanceof NbdConnectionError && /was cancelled/.test(err.message) && err.uri === mute.uri);
  // Already aborted: refused before connecting.
  const before = mute.connections;
  await assert.rejects(NbdClient.connect(mute.uri, { signal: controller.signal }), (err: unknown) => err instanceof NbdConnectionError && /was cancelled/.test(err.message));
  assert.equal(mute.connections, before);
  // Aborted while the socket connects (the server has not accepted it yet).
  const early = new AbortController();
  const attempt = NbdClient.connect(mute.uri, { signal: early.signal, timeout: 600_000 });
  early.abort();
  await assert.rejects(attempt, (err: unknown) => err instanceof NbdConnectionError && /was cancelled/.test(err.message));
});

test('NBD connectSibling: a second connection with the first one\'s options, and a server that describes the export differently on it', async (t) => {
  const dir = tempDir(t);
  const disk = randomBytes(MiB);
  const server = await startFakeServer(t, dir, disk, { flags: 1 | 2 | 256 });
  const client = await NbdClient.connect(server.uri, { metaContexts: [BASE_ALLOCATION] });
  assert.ok(client.flags & 256, 'CAN_MULTI_CONN');
  const sibling = await client.connectSibling();
  assert.equal(sibling.size, client.size);
  assert.equal(sibling.contexts.size, 0, 'a sibling only reads');
  const buffer = Buffer.alloc(MiB);
  await sibling.read(0, MiB, buffer);
  assert.ok(buffer.equals(disk));
  assert.deepEqual(server.reads, [0, 1]);
  await sibling.close();
  await client.close();

  const liar = await startFakeServer(t, dir, disk, { flags: 1 | 2 | 256, size: (n) => (n === 1 ? disk.length : disk.length / 2) });
  const first = await NbdClient.connect(liar.uri);
  await assert.rejects(first.connectSibling(), protocolError(/described the export differently on a second connection \(524288 bytes/));
  await first.close();
});
