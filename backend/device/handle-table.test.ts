import { describe, expect, it } from 'vitest';
import { HandleTable } from './handle-table.js';

describe('handle table', () => {
  it('hands out exactly `limit` handles, refuses the next, and never one past the end', () => {
    const t = new HandleTable<{ h: number }>(3);
    const got = [t.add((h) => ({ h })), t.add((h) => ({ h })), t.add((h) => ({ h }))].map((x) => x!.h);
    expect(got.sort()).toEqual([1, 2, 3]);
    expect(t.full).toBe(true);
    expect(t.add((h) => ({ h }))).toBeNull();
    expect(t.get(4)).toBeUndefined();
    expect(t.size).toBe(3);
  });

  it('treats 0, negatives, fractions and numbers past the limit as no object', () => {
    const t = new HandleTable<number>(2);
    t.add(() => 7);
    for (const h of [0, -1, 1.5, 3, 2 ** 32, Number.NaN]) expect(t.get(h)).toBeUndefined();
    expect(t.delete(0)).toBe(false);
  });

  it('reuses freed handles after going round, so a freed number is not handed out at once', () => {
    const t = new HandleTable<number>(4);
    const a = t.add((h) => h)!;
    t.add((h) => h);
    t.delete(a);
    expect(t.add((h) => h)).toBe(3);
    expect(t.add((h) => h)).toBe(4);
    expect(t.add((h) => h)).toBe(a);
  });

  it('restores an object under a given number only when it is free and in range', () => {
    const t = new HandleTable<string>(2);
    expect(t.put(2, 'x')).toBe(true);
    expect(t.put(2, 'y')).toBe(false);
    expect(t.put(3, 'z')).toBe(false);
    expect(t.get(2)).toBe('x');
  });
});
