import type { Command } from 'commander';

// Placeholder until the command is built (this session).
export function registerWrap(_program: Command): void {}
