// Numbers as people read them: units on every value, a dash where there is none.

export const NONE = "\u2013"; // en dash
export const FINAL = new Set(["succeeded", "failed", "canceled"]);

const KIB = 1024;
const UNITS = ["KiB", "MiB", "GiB", "TiB"];

/** 2992 -> "2.9 KiB", 44700000 -> "42.6 MiB". */
export function bytes(count) {
  if (count === null || count === undefined) return NONE;
  if (count < KIB) return `${count} B`;
  let value = count / KIB;
  let unit = 0;
  while (value >= KIB && unit < UNITS.length - 1) {
    value /= KIB;
    unit += 1;
  }
  return `${value.toFixed(value < 10 ? 2 : 1)} ${UNITS[unit]}`;
}

/** 0.9967 -> "99.7%". */
export function percent(fraction, digits = 1) {
  if (fraction === null || fraction === undefined) return NONE;
  return `${(fraction * 100).toFixed(digits)}%`;
}

/** A small or large positive number in few characters: losses, KL, logit differences. */
export function compact(value) {
  if (value === null || value === undefined) return NONE;
  if (value === 0) return "0";
  const size = Math.abs(value);
  if (size >= 1000 || size < 0.001) return value.toExponential(2);
  return value.toPrecision(3);
}

/** 0.49 -> "0.49 ms", 12.3 -> "12.3 ms". */
export function milliseconds(value) {
  if (value === null || value === undefined) return NONE;
  return `${value < 10 ? value.toFixed(2) : value.toFixed(1)} ms`;
}

/** 27.5 -> "27.5 s", 125 -> "2 min 05 s", 3720 -> "1 h 02 min". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return NONE;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const whole = Math.round(seconds);
  const pad = (n) => String(n).padStart(2, "0");
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${pad(whole % 60)} s`;
  const hours = Math.floor(whole / 3600);
  if (hours < 48) return `${hours} h ${pad(Math.floor((whole % 3600) / 60))} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

/** Seconds between two ISO times (``to`` defaults to now). */
export function secondsBetween(from, to = null) {
  if (!from) return null;
  const end = to ? Date.parse(to) : Date.now();
  return Math.max(0, (end - Date.parse(from)) / 1000);
}

/** "12 s ago", "5 min ago", "3 h ago", "2 d ago". */
export function age(isoTime) {
  const seconds = secondsBetween(isoTime);
  if (seconds === null) return NONE;
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

/** A job's running time: start to finish, or to now while it runs. */
export function jobDuration(job) {
  if (!job.started_at) return NONE;
  return duration(secondsBetween(job.started_at, job.finished_at));
}

/** "W4A4" from a job config. */
export function bits(config) {
  return `W${config?.weight_bits ?? "?"}A${config?.activation_bits ?? "?"}`;
}

/** 1234567 -> "1,234,567". */
export function integer(value) {
  return value === null || value === undefined ? NONE : Math.round(value).toLocaleString("en-US");
}

/** The first characters of an id, enough to tell jobs apart in a table. */
export function shortId(id) {
  return String(id).slice(0, 8);
}

/** A local date and time, to the second. */
export function timestamp(isoTime) {
  return isoTime ? new Date(isoTime).toLocaleString() : NONE;
}
