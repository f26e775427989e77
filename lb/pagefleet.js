// pagefleet's request router for NGINX (njs 0.7+), loaded by lb/nginx.conf.j2 when the fleet
// serves several model groups or routes by prompt prefix.
//
// route(r):  reads the JSON body, picks the model group from its `model` (OpenAI and Ollama
//            routes alike; GET /v1/models/{id} by its path), sets $pf_prefix (the prompt's
//            first characters, the key of prefix-aware routing) and $pf_session_key (session
//            affinity's key) and redirects to @pf_g<N>.
//            An unknown model gets a 404 in the route's own error shape, listing the models.
// models(r): GET /v1/models and /api/tags: every group's answer, merged into one list.
//
// $pf_routes (rendered by fleetctl) holds {"models": {served name: group number},
// "default": group number, "num_groups": N, "prefix_chars": characters of the prefix key}.
// Invariant: a body is parsed as JSON only; "model" inside message text, escaped quotes and key
// order cannot fool it.

// The body is in memory: lb/nginx.conf.j2 keeps client_body_buffer_size as large as
// client_max_body_size (a body in a temporary file could not be read here: NGINX unlinks it).
function readBody(r) {
    try {
        return r.requestText || '';
    } catch (e) {
        return '';
    }
}

function parse(text) {
    if (!text) {
        return null;
    }
    try {
        var value = JSON.parse(text);
        return (value && typeof value === 'object' && !Array.isArray(value)) ? value : null;
    } catch (e) {
        return null;
    }
}

function modelOf(r, body) {
    if (body && typeof body.model === 'string') {
        return body.model;
    }
    if (body && r.uri.indexOf('/api/') === 0 && typeof body.name === 'string') {
        return body.name;  // older Ollama clients name the model `name` (/api/show, /api/pull)
    }
    var m = r.uri.match(/^\/v1\/models\/(.+)$/);
    return m ? decodeURIComponent(m[1]) : null;
}

function groupOf(routes, model) {
    var group = routes.models[model];
    if (group === undefined && /:latest$/.test(model)) {
        group = routes.models[model.slice(0, -':latest'.length)];  // Ollama's default tag
    }
    return group;
}

function contentText(content) {
    if (typeof content === 'string') {
        return content;
    }
    return JSON.stringify(content === undefined ? null : content);
}

// What the replica's prefix cache sees first: tools and system prompt, then the messages in
// order (or the prompt: text, or token ids), cut at prefix_chars characters (~4 per token).
function prefixKey(body, numChars) {
    if (!body) {
        return '';
    }
    var parts = [];
    if (body.tools !== undefined) {
        parts.push(JSON.stringify(body.tools));
    }
    if (typeof body.system === 'string') {
        parts.push(body.system);
    }
    if (Array.isArray(body.messages)) {
        for (var i = 0; i < body.messages.length; i++) {
            var message = body.messages[i] || {};
            parts.push(String(message.role) + ':' + contentText(message.content));
        }
    } else if (Array.isArray(body.prompt) && typeof body.prompt[0] === 'number') {
        parts.push(body.prompt.slice(0, Math.ceil(numChars / 4)).join(','));
    } else if (body.prompt !== undefined) {
        parts.push(contentText(body.prompt));
    }
    return parts.join('\n').slice(0, numChars);
}

// Session affinity: the X-Session-ID header, else the body's top-level "user", else the
// client (its API key when it sends one of the fleet's, else its address).
function sessionKey(r, body) {
    var header = r.headersIn['X-Session-ID'];
    if (header) {
        return 'h:' + header;
    }
    if (body && typeof body.user === 'string' && body.user.length > 0) {
        return 'u:' + body.user.slice(0, 256);
    }
    var client = r.variables.pf_client;
    return (client && client.indexOf('key') === 0) ? 'c:' + client : 'a:' + r.remoteAddress;
}

function notFound(r, model, routes) {
    var names = Object.keys(routes.models).sort().join(', ');
    var body;
    if (r.uri.indexOf('/api/') === 0) {
        body = {error: 'model "' + model + '" not found; this fleet serves: ' + names};
    } else {
        body = {error: {message: 'The model `' + model + '` does not exist; this fleet serves: ' + names,
                        type: 'invalid_request_error', param: 'model', code: 'model_not_found'}};
    }
    r.headersOut['Content-Type'] = 'application/json';
    r.return(404, JSON.stringify(body) + '\n');
}

function route(r) {
    var routes = JSON.parse(r.variables.pf_routes);
    var body = parse(readBody(r));
    var model = modelOf(r, body);
    var group = routes['default'];  // no model: the replica answers with its own error
    if (model !== null) {
        group = groupOf(routes, model);
        if (group === undefined) {
            notFound(r, model, routes);
            return;
        }
    }
    r.variables.pf_prefix = prefixKey(body, routes.prefix_chars) || r.variables.request_id;
    r.variables.pf_session_key = sessionKey(r, body);
    r.internalRedirect('@pf_g' + group);
}

function models(r) {
    var routes = JSON.parse(r.variables.pf_routes);
    var isOllama = r.uri === '/api/tags';
    var calls = [];
    for (var group = 1; group <= routes.num_groups; group++) {
        calls.push(r.subrequest('/_pf/g' + group + (isOllama ? '/api/tags' : '/v1/models')));
    }
    Promise.all(calls).then(function (replies) {
        var items = [];
        var status = 503;
        for (var i = 0; i < replies.length; i++) {
            var reply = replies[i];
            if (reply.status !== 200) {
                status = status === 200 ? 200 : reply.status;  // e.g. 401 without the API key
                continue;
            }
            var answer = parse(reply.responseText);
            var list = answer && (isOllama ? answer.models : answer.data);
            if (Array.isArray(list)) {
                items = items.concat(list);
                status = 200;
            }
        }
        r.headersOut['Content-Type'] = 'application/json';
        if (status !== 200) {
            r.return(status, replies[0].responseText || '');
            return;
        }
        r.return(200, JSON.stringify(isOllama ? {models: items} : {object: 'list', data: items}) + '\n');
    });
}

export default {route, models, prefixKey};
