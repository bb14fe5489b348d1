// The token and every call to the collector's API. The token lives in
// sessionStorage only: it is gone when the tab closes.

const KEY = 'ctw.token';
let onUnauthorized = () => {};

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

// Called with a message whenever the API answers 401.
export function setUnauthorizedHandler(f) {
  onUnauthorized = f;
}

// GET (or POST with `body`) an /api/ path with the token; resolves to the
// parsed JSON, rejects with ApiError (status 0 for network errors).
export async function api(path, { body, tokenOverride, signal } = {}) {
  const t = tokenOverride ?? token.get();
  const headers = { Accept: 'application/json' };
  if (t) headers.Authorization = `Bearer ${t}`;
  const init = { method: 'GET', headers, signal, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) {
    init.method = 'POST';
    headers['Content-Type'] = 'application/json';
    init.body = typeof body === 'string' ? body : JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { error: `cannot reach the collector: ${e.message}` });
  }
  let json = null;
  const text = await resp.text();
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = { error: text.slice(0, 200) || `HTTP ${resp.status}` };
  }
  if (resp.status === 401 && tokenOverride === undefined) {
    onUnauthorized('The collector refused the token (401). Sign in again.');
  }
  if (!resp.ok) throw new ApiError(resp.status, json);
  return json;
}

// Query string from an object, skipping empty values.
export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && String(v).trim() !== '') u.set(k, String(v).trim());
  }
  return u.toString();
}
