/**
 * The qcow2 codec: pure functions over Uint8Array/DataView, no I/O and no node: imports, so it
 * runs in any JavaScript runtime. Everything on disk is declared once here.
 */
export * from './constants.js';
export * from './bytes.js';
export * from './header.js';
export * from './tables.js';
export * from './refcount.js';
export * from './layout.js';
