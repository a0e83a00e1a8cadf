// The admin key, kept in this tab's sessionStorage only (never a cookie, never a URL), and the gateway calls that
// carry it as Authorization: Bearer. Same origin only: the page's policy (connect-src 'self') allows no other.
const KEY = "llama-gateway.admin-key";

export function savedKey() {
  return sessionStorage.getItem(KEY);
}

export function saveKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

// Call one of the gateway's JSON routes with the admin key (the saved one unless given); resolves to the Response.
export function call(path, { method = "GET", body, key = savedKey(), signal } = {}) {
  if (!key) return Promise.reject(new Error("Signed out."));  // never "Bearer null": signed out, nothing is sent
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return fetch(path, {
    method, headers, signal, cache: "no-store", credentials: "omit",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

// The message of an error answer (the gateway's error envelope), or its status when it has none.
export async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") return body.error.message;
  } catch (ignored) {
    // Not JSON: the status alone says it.
  }
  return `HTTP ${response.status}`;
}
