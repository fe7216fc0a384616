/**
 * NBD servers for tests: real qemu-nbd processes (Unix socket or TCP on 127.0.0.1), TLS
 * certificates made with openssl, and a small fake server of ours that misbehaves on demand —
 * for hostile replies a real server never sends, and for extended headers, which qemu-nbd 7.2
 * does not offer.
 */

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createServer, connect, type AddressInfo, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import type { TestContext } from 'node:test';

const onPath = (name: string) => spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
export const hasQemuNbd = onPath('qemu-nbd');
export const hasOpenssl = onPath('openssl');
export const hasNbdinfo = onPath('nbdinfo');

export function needQemuNbd(t: TestContext): boolean {
  if (hasQemuNbd && onPath('qemu-img')) return true;
  t.skip('qemu-nbd not installed (apt-get install qemu-utils)');
  return false;
}

/** A free TCP port on 127.0.0.1 (released before qemu-nbd binds it). */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

export interface QemuNbd {
  /** The URI to connect to. */
  uri: string;
  process: ChildProcess;
  /** Kills the server at once (SIGKILL). */
  kill(): void;
}

export interface QemuNbdOptions {
  format: 'raw' | 'qcow2';
  /** Serve over TCP on 127.0.0.1 instead of a Unix socket in `dir`. */
  tcp?: boolean;
  /** `-B NAME`: publish this persistent bitmap as qemu:dirty-bitmap:NAME. */
  bitmap?: string;
  /** The export name (`-x`). */
  exportName?: string;
  /** Extra arguments (TLS objects…). */
  args?: string[];
  /** The URI scheme prefix for TLS ('nbds'). */
  scheme?: 'nbd' | 'nbds';
  /** Query parameters added to the URI. */
  query?: string;
}

/**
 * Starts `qemu-nbd -r -t` on `image` and waits until it accepts connections; stopped after the test.
 */
export async function startQemuNbd(t: TestContext, dir: string, image: string, options: QemuNbdOptions): Promise<QemuNbd> {
  const scheme = options.scheme ?? 'nbd';
  const name = options.exportName ?? '';
  const args = ['-r', '-t', '-e', '8', '-f', options.format, '--cache=none', '--aio=threads', ...(options.exportName ? ['-x', name] : []), ...(options.bitmap ? ['-B', options.bitmap] : []), ...(options.args ?? [])];
  let uri: string;
  let probe: () => Socket;
  if (options.tcp) {
    const port = await freePort();
    args.push('-b', '127.0.0.1', '-p', String(port));
    uri = `${scheme}://127.0.0.1:${port}/${encodeURIComponent(name)}${options.query ? `?${options.query}` : ''}`;
    probe = () => connect({ host: '127.0.0.1', port });
  } else {
    const socket = join(dir, `nbd-${Math.random().toString(36).slice(2)}.sock`);
    args.push('-k', socket);
    uri = `${scheme}+unix:///${encodeURIComponent(name)}?socket=${encodeURIComponent(socket)}${options.query ? `&${options.query}` : ''}`;
    probe = () => connect({ path: socket });
  }
  args.push(image);
  const child = spawn('qemu-nbd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  let exited = false;
  child.once('exit', () => (exited = true));
  t.after(() => {
    if (!exited) child.kill('SIGKILL');
  });
  // Ready once a connection is accepted (qemu-nbd binds before it serves).
  for (let attempt = 0; ; attempt++) {
    if (exited) throw new Error(`qemu-nbd exited: ${stderr}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = probe();
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) break;
    if (attempt > 250) throw new Error(`qemu-nbd did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return { uri, process: child, kill: () => child.kill('SIGKILL') };
}

/** Test certificates: a CA, a server certificate for 127.0.0.1/localhost, a client certificate. */
export interface TestCertificates {
  /** qemu's server directory: ca-cert.pem, server-cert.pem, server-key.pem. */
  serverDir: string;
  /** libnbd's client directory: ca-cert.pem, client-cert.pem, client-key.pem. */
  clientDir: string;
  /** A CA that signed none of these (for the refusal test). */
  otherCa: string;
}

export function makeCertificates(dir: string): TestCertificates {
  const serverDir = join(dir, 'server-pki');
  const clientDir = join(dir, 'client-pki');
  mkdirSync(serverDir);
  mkdirSync(clientDir);
  const ssl = (args: string[]) => {
    const r = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
  };
  const ca = (name: string) => ssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}-cert.pem`, '-days', '2', '-subj', `/CN=${name}`]);
  ca('ca');
  ca('other-ca');
  const leaf = (name: string, ext: string) => {
    ssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${name}`]);
    writeFileSync(join(dir, `${name}.ext`), ext);
    ssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '2', '-extfile', `${name}.ext`]);
  };
  leaf('server', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n');
  leaf('client', 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n');
  const copy = (from: string, to: string) => writeFileSync(to, spawnSync('cat', [join(dir, from)]).stdout);
  copy('ca-cert.pem', join(serverDir, 'ca-cert.pem'));
  copy('server-cert.pem', join(serverDir, 'server-cert.pem'));
  copy('server-key.pem', join(serverDir, 'server-key.pem'));
  copy('ca-cert.pem', join(clientDir, 'ca-cert.pem'));
  copy('client-cert.pem', join(clientDir, 'client-cert.pem'));
  copy('client-key.pem', join(clientDir, 'client-key.pem'));
  return { serverDir, clientDir, otherCa: join(dir, 'other-ca-cert.pem') };
}

// ─── The fake server ─────────────────────────────────────────────────────────────────────────

/** How the fake server misbehaves. Each hook may write raw bytes and return true to skip the normal answer. */
export interface FakeBehaviour {
  /** Replace the greeting (default: a correct fixed-newstyle greeting). */
  greeting?: Buffer;
  /** Accept NBD_OPT_EXTENDED_HEADERS (qemu-nbd 7.2 does not). */
  extendedHeaders?: boolean;
  /** The maximum block size announced (default 1 MiB). */
  maxBlock?: number;
  /** Refuse structured replies (a server with simple replies only). */
  noStructured?: boolean;
  /** Called for every option; return true when the hook answered it. */
  onOption?: (socket: Socket, option: number, data: Buffer) => boolean;
  /** Called for every command (`connection` counts from 1); return true when the hook answered it (or chose silence). */
  onCommand?: (socket: Socket, command: Command, connection: number) => boolean;
  /** Transmission flags announced (default HAS_FLAGS | READ_ONLY; add 256 for CAN_MULTI_CONN). */
  flags?: number;
  /** The export size announced on the nth connection (default: the disk's). */
  size?: (connection: number) => number;
}

export interface Command {
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
  extended: boolean;
}

export interface FakeServer {
  uri: string;
  /** Connections accepted so far. */
  connections: number;
  /** NBD_CMD_DISC requests received so far. */
  disconnects: number;
  /** Read commands received, per connection (index 0 is the first connection). */
  reads: number[];
  close(): Promise<void>;
}

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
};
const u64 = (n: number | bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};
const u16 = (n: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
};

export function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([u64(0x3e889045565a9n), u32(option), u32(type), u32(data.length), data]);
}

/** A structured (or extended) reply chunk header + payload. */
export function chunk(command: Command, flags: number, type: number, payload: Buffer, lengthOverride?: number): Buffer {
  const length = lengthOverride ?? payload.length;
  if (command.extended) return Buffer.concat([u32(0x6e8a278c), u16(flags), u16(type), u64(command.cookie), u64(command.offset), u64(length), payload]);
  return Buffer.concat([u32(0x668e33ef), u16(flags), u16(type), u64(command.cookie), u32(length), payload]);
}

export { u16, u32, u64 };

/**
 * A fake NBD server on a Unix socket serving `disk` (in memory) with base:allocation (all data
 * except all-zero 64 KiB blocks, reported as holes) and a dirty bitmap 'b0' (every other 64 KiB).
 */
export async function startFakeServer(t: TestContext, dir: string, disk: Buffer, behaviour: FakeBehaviour = {}): Promise<FakeServer> {
  const path = join(dir, `fake-${Math.random().toString(36).slice(2)}.sock`);
  const sockets = new Set<Socket>();
  const state = { connections: 0, disconnects: 0, reads: [] as number[] };
  const server: Server = createServer((socket) => {
    const connection = ++state.connections;
    state.reads.push(0);
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    serve(socket, disk, behaviour, state, connection);
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise((resolve) => server.close(resolve));
  };
  t.after(close);
  return {
    uri: `nbd+unix:///?socket=${encodeURIComponent(path)}`,
    get connections() {
      return state.connections;
    },
    get disconnects() {
      return state.disconnects;
    },
    reads: state.reads,
    close,
  };
}

function serve(socket: Socket, disk: Buffer, behaviour: FakeBehaviour, state: { disconnects: number; reads: number[] }, connection: number): void {
  let buffered = Buffer.alloc(0);
  let phase: 'flags' | 'options' | 'transmission' = 'flags';
  let structured = false;
  let extended = false;
  const contexts = new Map<number, string>();
  socket.write(behaviour.greeting ?? Buffer.concat([Buffer.from('NBDMAGIC'), Buffer.from('IHAVEOPT'), u16(3)]));
  socket.on('data', (data: Buffer) => {
    buffered = Buffer.concat([buffered, data]);
    for (;;) {
      if (phase === 'flags') {
        if (buffered.length < 4) return;
        buffered = buffered.subarray(4);
        phase = 'options';
      } else if (phase === 'options') {
        if (buffered.length < 16) return;
        const length = buffered.readUInt32BE(12);
        if (buffered.length < 16 + length) return;
        const option = buffered.readUInt32BE(8);
        const body = buffered.subarray(16, 16 + length);
        buffered = buffered.subarray(16 + length);
        if (behaviour.onOption?.(socket, option, body)) continue;
        if (option === 11 && behaviour.extendedHeaders) {
          extended = structured = true;
          socket.write(optionReply(option, 1));
        } else if (option === 8 && !behaviour.noStructured) {
          structured = true;
          socket.write(optionReply(option, 1));
        } else if (option === 10) {
          const nameLength = body.readUInt32BE(0);
          let at = 4 + nameLength;
          const count = body.readUInt32BE(at);
          at += 4;
          for (let i = 0; i < count; i++) {
            const n = body.readUInt32BE(at);
            const query = body.toString('utf8', at + 4, at + 4 + n);
            at += 4 + n;
            if (query === 'base:allocation' || query === 'qemu:dirty-bitmap:b0') {
              const id = query === 'base:allocation' ? 1 : 7;
              contexts.set(id, query);
              socket.write(optionReply(option, 4, Buffer.concat([u32(id), Buffer.from(query)])));
            }
          }
          socket.write(optionReply(option, 1));
        } else if (option === 7) {
          socket.write(optionReply(option, 3, Buffer.concat([u16(0), u64(behaviour.size?.(connection) ?? disk.length), u16(behaviour.flags ?? 1 | 2)])));
          socket.write(optionReply(option, 3, Buffer.concat([u16(3), u32(1), u32(4096), u32(behaviour.maxBlock ?? 1024 * 1024)])));
          socket.write(optionReply(option, 1));
          phase = 'transmission';
        } else {
          socket.write(optionReply(option, 0x80000001));
        }
      } else {
        const size = extended ? 32 : 28;
        if (buffered.length < size) return;
        const command: Command = {
          type: buffered.readUInt16BE(6),
          cookie: buffered.readBigUInt64BE(8),
          offset: Number(buffered.readBigUInt64BE(16)),
          length: extended ? Number(buffered.readBigUInt64BE(24)) : buffered.readUInt32BE(24),
          extended,
        };
        buffered = buffered.subarray(size);
        if (command.type === 2) {
          state.disconnects++;
          socket.end();
          return;
        }
        if (command.type === 0) state.reads[connection - 1]!++;
        if (behaviour.onCommand?.(socket, command, connection)) continue;
        answer(socket, command, disk, structured, contexts);
      }
    }
  });
}

const FAKE_BLOCK = 65536;

/** The correct answer to a command, for the parts of the protocol the fake serves. */
function answer(socket: Socket, command: Command, disk: Buffer, structured: boolean, contexts: Map<number, string>): void {
  const { offset, length } = command;
  if (command.type === 0) {
    const data = disk.subarray(offset, offset + length);
    if (!structured) {
      socket.write(Buffer.concat([u32(0x67446698), u32(0), u64(command.cookie), data]));
      return;
    }
    socket.write(chunk(command, 1, 1, Buffer.concat([u64(offset), data])));
    return;
  }
  if (command.type === 7) {
    const ids = [...contexts.keys()];
    ids.forEach((id, i) => {
      const name = contexts.get(id)!;
      const extents: Array<[number, number]> = [];
      for (let at = offset; at < offset + length; ) {
        const end = Math.min(offset + length, (Math.floor(at / FAKE_BLOCK) + 1) * FAKE_BLOCK);
        const block = Math.floor(at / FAKE_BLOCK);
        const flags = name === 'base:allocation' ? (disk.subarray(at, end).every((b) => b === 0) ? 3 : 0) : block % 2 === 0 ? 1 : 0;
        extents.push([end - at, flags]);
        at = end;
      }
      const body = command.extended
        ? Buffer.concat([u32(id), u32(extents.length), ...extents.flatMap(([l, f]) => [u64(l), u64(f)])])
        : Buffer.concat([u32(id), ...extents.flatMap(([l, f]) => [u32(l), u32(f)])]);
      socket.write(chunk(command, i === ids.length - 1 ? 1 : 0, command.extended ? 6 : 5, body));
    });
    return;
  }
  socket.write(chunk(command, 1, 0x8001, Buffer.concat([u32(22), u16(0)])));
}
